"""The PKCS#11 key store: CA keys generated on, kept in, and used through a hardware token (or SoftHSM2).

Invariants:

- A private key never exists outside the token. Keys are generated on the token with
  ``CKA_SENSITIVE=True`` and ``CKA_EXTRACTABLE=False``; :meth:`Pkcs11KeyStore.load` refuses any key the
  token reports as extractable or not sensitive, and the key object it hands out refuses ``private_bytes``,
  ``private_numbers`` and ``exchange``.
- Every signature is checked against the key's public half before it is returned, so a faulty token or a key
  swapped on the token cannot make Warden publish a certificate, CRL or OCSP answer that does not verify.
- The PIN never appears in a message, a hint, a ``repr`` or :meth:`Pkcs11Uri.redacted`; errors name the
  token, the module path and the key label only.
- All token access goes through one logged-in session per token and process, opened lazily, reused, and
  serialised by one lock (a PKCS#11 session runs one operation at a time). Key stores naming the same token
  share it, because the PKCS#11 login is per process, not per session; the last one to close logs out.
- Every python-pkcs11 exception is wrapped at this boundary (``raise ... from e``) into
  :class:`~warden.core.KeyStoreError` or :class:`~warden.core.KeyStoreLockedError`; URI syntax errors are
  :class:`~warden.core.InvalidInputError`.

The token is named by an RFC 7512 URI, e.g.
``pkcs11:token=warden?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/warden/token.pin``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import string
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pkcs11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pkcs11 import exceptions as p11e
from pkcs11.constants import Attribute, MechanismFlag, ObjectClass, TokenFlag
from pkcs11.mechanisms import KeyType, Mechanism
from pkcs11.types import Object, PublicKey, Session, SignMixin, Slot, Token
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from warden.core import InvalidInputError, KeyStoreError, KeyStoreLockedError
from warden.pki._keystore import KeyAlgorithm, check_label

if TYPE_CHECKING:
    from cryptography.utils import Buffer
    from pkcs11 import _pkcs11

__all__ = ["Pkcs11KeyStore", "Pkcs11PrivateKey", "Pkcs11Uri", "parse_pkcs11_uri"]

_T = TypeVar("_T")

_SCHEME = "pkcs11:"
MAX_URI_CHARS = 4096
MAX_PIN_FILE_BYTES = 1024
_EXAMPLE_URI = "pkcs11:token=warden?module-path=/usr/lib/softhsm/libsofthsm2.so"
_MODULE_PATH_HINT = "e.g. module-path=/usr/lib/softhsm/libsofthsm2.so"

# RFC 7512 section 2.3: what an attribute value may hold without percent-encoding. The path also admits "&",
# the query "/", "?" and "|"; anything else (space, "#", a bare "%", non-ASCII, ...) must be escaped.
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_RES_AVAIL = frozenset(":[]@!$'()*+,=")
_PATH_CHARS = _UNRESERVED | _RES_AVAIL | {"&"}
_QUERY_CHARS = _UNRESERVED | _RES_AVAIL | {"/", "?", "|"}
# What redacted() leaves unescaped: a subset of the above minus the delimiters, so the output re-parses.
_PATH_SAFE = frozenset(string.ascii_letters + string.digits + "-._~:[]@!$'()*+,")
_QUERY_SAFE = _PATH_SAFE | {"/", "|"}
_ATTR_NAME_CHARS = frozenset(string.ascii_lowercase + string.digits + "-_")
_HEX = frozenset(string.hexdigits)

_TEXT_PATH_ATTRS = (
    "token",
    "manufacturer",
    "serial",
    "model",
    "library-manufacturer",
    "library-description",
    "object",
    "slot-description",
    "slot-manufacturer",
)
_PATH_ATTRS = frozenset((*_TEXT_PATH_ATTRS, "library-version", "type", "id", "slot-id"))
_QUERY_ATTRS = frozenset(("module-path", "module-name", "pin-value", "pin-source"))
_OBJECT_TYPES = frozenset(("public", "private", "cert", "secret-key", "data"))


@dataclass(frozen=True, slots=True)
class Pkcs11Uri:
    """A parsed RFC 7512 URI. ``str()`` is :meth:`redacted`; the PIN is kept out of ``repr`` too.

    ``object_label``, ``object_id`` and ``object_type`` are parsed for completeness but the key store does
    not use them: it names keys by its own labels.
    """

    module_path: str
    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    slot_id: int | None = None
    slot_description: str | None = None
    slot_manufacturer: str | None = None
    library_manufacturer: str | None = None
    library_description: str | None = None
    library_version: tuple[int, int] | None = None
    object_label: str | None = None
    object_id: bytes | None = None
    object_type: str | None = None
    module_name: str | None = None
    pin_file: Path | None = None
    pin_value: str | None = field(default=None, repr=False)

    def redacted(self) -> str:
        """The URI in canonical form, with ``pin-value=***`` in place of the PIN."""
        return self._render(pin_mark="***")

    def without_pin(self) -> str:
        """The URI in canonical form with any ``pin-value`` left out: what may be written to a settings file."""
        return self._render(pin_mark=None)

    def _render(self, *, pin_mark: str | None) -> str:
        path: list[str] = []

        def add(name: str, value: str | bytes | None) -> None:
            if value is not None:
                data = value.encode() if isinstance(value, str) else value
                path.append(f"{name}={_pct_encode(data, _PATH_SAFE)}")

        add("token", self.token)
        add("manufacturer", self.manufacturer)
        add("serial", self.serial)
        add("model", self.model)
        if self.slot_id is not None:
            path.append(f"slot-id={self.slot_id}")
        add("slot-description", self.slot_description)
        add("slot-manufacturer", self.slot_manufacturer)
        add("library-manufacturer", self.library_manufacturer)
        add("library-description", self.library_description)
        if self.library_version is not None:
            path.append(f"library-version={self.library_version[0]}.{self.library_version[1]}")
        add("object", self.object_label)
        add("id", self.object_id)
        if self.object_type is not None:
            path.append(f"type={self.object_type}")
        query: list[str] = []
        if self.module_name is not None:
            query.append(f"module-name={_pct_encode(self.module_name.encode(), _QUERY_SAFE)}")
        query.append(f"module-path={_pct_encode(self.module_path.encode(), _QUERY_SAFE)}")
        if self.pin_file is not None:
            query.append(f"pin-source=file:{_pct_encode(str(self.pin_file).encode(), _QUERY_SAFE)}")
        if self.pin_value is not None and pin_mark is not None:
            query.append(f"pin-value={pin_mark}")
        return f"{_SCHEME}{';'.join(path)}?{'&'.join(query)}"

    def __str__(self) -> str:
        return self.redacted()

    def read_pin(self) -> str | None:
        """The PIN from ``pin-value``, or from the ``pin-source`` file (at most 1 KiB); None if neither."""
        if self.pin_value is not None:
            return self.pin_value
        if self.pin_file is None:
            return None
        try:
            with self.pin_file.open("rb") as f:
                data = f.read(MAX_PIN_FILE_BYTES + 1)
        except OSError as e:
            raise KeyStoreError(
                f"cannot read the PIN file {self.pin_file}: {e.strerror}",
                hint="check pin-source in the PKCS#11 URI and the file's permissions",
            ) from e
        if len(data) > MAX_PIN_FILE_BYTES:
            raise KeyStoreError(
                f"the PIN file {self.pin_file} is larger than {MAX_PIN_FILE_BYTES} bytes",
                hint="the file must hold the PIN only",
            )
        try:
            pin = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise KeyStoreError(f"the PIN file {self.pin_file} is not UTF-8 text") from e
        # Editors and `echo` add a final newline that is not part of the PIN.
        pin = pin.rstrip("\r\n")
        if not pin:
            raise KeyStoreLockedError(f"the PIN file {self.pin_file} is empty")
        return pin

    def token_name(self) -> str:
        """How messages name the token: its label, else its serial, else its slot."""
        if self.token:
            return f"labelled {self.token!r}"
        if self.serial:
            return f"with serial {self.serial!r}"
        return f"in slot {self.slot_id}"


def _bad_uri(message: str, hint: str | None = None) -> InvalidInputError:
    return InvalidInputError(message, hint=hint or f"a PKCS#11 URI looks like {_EXAMPLE_URI}")


def _pct_decode(raw: str, allowed: frozenset[str], name: str) -> bytes:
    """RFC 7512 percent-decoding; a character the component admits only escaped is an error (fail closed)."""
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i]
        if c == "%":
            pair = raw[i + 1 : i + 3]
            if len(pair) != 2 or not set(pair) <= _HEX:
                # Never echo the value: it may be (part of) a PIN.
                raise _bad_uri(f"the {name} attribute of the PKCS#11 URI has a '%' without two hex digits")
            out.append(int(pair, 16))
            i += 3
            continue
        if c not in allowed:
            raise _bad_uri(
                f"the {name} attribute of the PKCS#11 URI has a character that must be percent-encoded",
                hint="write e.g. a space as %20, '/' in the path part as %2F, '&' in the query part as %26",
            )
        out.append(ord(c))
        i += 1
    return bytes(out)


def _pct_encode(data: bytes, safe: frozenset[str]) -> str:
    return "".join(chr(b) if chr(b) in safe else f"%{b:02X}" for b in data)


def _split_attrs(component: str, sep: str, known: frozenset[str], where: str) -> dict[str, str]:
    """The ``name=value`` runs of one component, still escaped. Vendor attributes are checked and dropped."""
    attrs: dict[str, str] = {}
    if not component:
        return attrs
    vendor: set[str] = set()
    allowed = _PATH_CHARS if where == "path" else _QUERY_CHARS
    for run in component.split(sep):
        raw_name, eq, raw = run.partition("=")
        # ABNF string literals are case-insensitive (RFC 5234 section 2.3), so MODULE-PATH is module-path.
        name = raw_name.lower()
        if not run or not eq or not name or not set(name) <= _ATTR_NAME_CHARS:
            raise _bad_uri(f"the {where} part of the PKCS#11 URI has an attribute that is not name=value")
        if name in known:
            if name in attrs:
                raise _bad_uri(f"the {name} attribute appears more than once in the PKCS#11 URI")
            attrs[name] = raw
            continue
        # A vendor attribute (RFC 7512 section 2.3): must still be well-formed, may repeat in the query only.
        if where == "path" and name in vendor:
            raise _bad_uri(f"the {name} attribute appears more than once in the PKCS#11 URI")
        vendor.add(name)
        _pct_decode(raw, allowed, name)
    return attrs


def _text(raw: str, allowed: frozenset[str], name: str) -> str:
    try:
        return _pct_decode(raw, allowed, name).decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad_uri(f"the {name} attribute of the PKCS#11 URI is not UTF-8 once percent-decoded") from e


def _pin_file(value: str) -> Path:
    # RFC 8089 file URIs: file:/abs, file:///abs and file://localhost/abs all name a local absolute path.
    hint = "e.g. pin-source=file:/etc/warden/token.pin"
    if not value.startswith("file:"):
        raise _bad_uri("pin-source in the PKCS#11 URI supports file: paths only", hint=hint)
    rest = value[len("file:") :]
    if rest.startswith("//"):
        host, slash, path = rest[2:].partition("/")
        if host not in ("", "localhost"):
            raise _bad_uri("pin-source in the PKCS#11 URI must name a local file", hint=hint)
        rest = slash + path
    if not rest.startswith("/"):
        raise _bad_uri("pin-source in the PKCS#11 URI must be an absolute file path", hint=hint)
    return Path(rest)


def parse_pkcs11_uri(uri: str) -> Pkcs11Uri:
    """Parse an RFC 7512 PKCS#11 URI naming a token (and the module to load it with).

    Raises :class:`InvalidInputError` for anything that is not a well-formed URI, a duplicate attribute, a
    missing ``module-path`` or token identification (``token``, ``serial`` or ``slot-id``), both
    ``pin-value`` and ``pin-source``, or a ``pin-source`` that is not a ``file:`` path. Reads no file: the PIN
    file is read by :meth:`Pkcs11Uri.read_pin` when the key store logs in.
    """
    if len(uri) > MAX_URI_CHARS:
        raise _bad_uri(f"the PKCS#11 URI is longer than {MAX_URI_CHARS} characters")
    if uri[: len(_SCHEME)].lower() != _SCHEME:
        # Never echo the input: a mistyped URI may still carry a PIN.
        raise _bad_uri("not a PKCS#11 URI: it must start with 'pkcs11:'")
    path_part, _, query_part = uri[len(_SCHEME) :].partition("?")
    p = _split_attrs(path_part, ";", _PATH_ATTRS, "path")
    q = _split_attrs(query_part, "&", _QUERY_ATTRS, "query")

    texts = {name: _text(p[name], _PATH_CHARS, name) for name in _TEXT_PATH_ATTRS if name in p}
    slot_id: int | None = None
    if "slot-id" in p:
        # 1*DIGIT in the ABNF, no escapes; 20 digits bound it to an unsigned 64-bit CK_SLOT_ID.
        raw = p["slot-id"]
        if not raw.isascii() or not raw.isdigit() or len(raw) > 20:
            raise _bad_uri("slot-id in the PKCS#11 URI must be a decimal number")
        slot_id = int(raw)
    library_version: tuple[int, int] | None = None
    if "library-version" in p:
        major, dot, minor = p["library-version"].partition(".")
        parts = (major, minor) if dot else (major,)
        if not all(x.isascii() and x.isdigit() and len(x) <= 3 and int(x) <= 255 for x in parts):
            raise _bad_uri("library-version in the PKCS#11 URI must be like 2 or 2.6 (each part 0-255)")
        library_version = (int(major), int(minor) if dot else 0)
    object_type: str | None = None
    if "type" in p:
        object_type = p["type"].lower()
        if object_type not in _OBJECT_TYPES:
            raise _bad_uri("type in the PKCS#11 URI must be one of public, private, cert, secret-key, data")
    object_id = _pct_decode(p["id"], _PATH_CHARS, "id") if "id" in p else None

    query = {name: _text(raw, _QUERY_CHARS, name) for name, raw in q.items()}
    module_path = query.get("module-path")
    if not module_path:
        raise _bad_uri("the PKCS#11 URI has no module-path", hint=_MODULE_PATH_HINT)
    if not os.path.isabs(module_path):
        raise _bad_uri("module-path in the PKCS#11 URI must be an absolute path", hint=_MODULE_PATH_HINT)
    if not (texts.get("token") or texts.get("serial") or slot_id is not None):
        raise _bad_uri(
            "the PKCS#11 URI does not say which token to use",
            hint=f"add token=<label> (or serial= or slot-id=), e.g. {_EXAMPLE_URI}",
        )
    if "pin-value" in query and "pin-source" in query:
        raise _bad_uri("the PKCS#11 URI has both pin-value and pin-source", hint="keep one of them")
    return Pkcs11Uri(
        module_path=module_path,
        token=texts.get("token"),
        manufacturer=texts.get("manufacturer"),
        serial=texts.get("serial"),
        model=texts.get("model"),
        slot_id=slot_id,
        slot_description=texts.get("slot-description"),
        slot_manufacturer=texts.get("slot-manufacturer"),
        library_manufacturer=texts.get("library-manufacturer"),
        library_description=texts.get("library-description"),
        library_version=library_version,
        object_label=texts.get("object"),
        object_id=object_id,
        object_type=object_type,
        module_name=query.get("module-name"),
        pin_file=_pin_file(query["pin-source"]) if "pin-source" in query else None,
        pin_value=query.get("pin-value"),
    )


# The session handle is gone (module re-initialised, token removed): forget it, never close it, since the token
# may already have handed the same handle number to a new session.
_SESSION_GONE: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
)
# The session is still ours but the login is gone (code outside Warden called C_Logout), which also invalidates
# the handles of private objects: close it and log in on a fresh one.
_LOGIN_GONE: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.UserNotLoggedIn,
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
)

_CURVES: Mapping[KeyAlgorithm, str] = {KeyAlgorithm.P256: "secp256r1", KeyAlgorithm.P384: "secp384r1"}
_SIGN_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_SIGN_DIGEST_SIZES = frozenset((32, 48, 64))


def _login_error(e: p11e.PKCS11Error, where: str, final_try: bool) -> KeyStoreError:
    """Map a C_Login failure to our tree. ``where`` names the token; the PIN is never part of any message."""
    if isinstance(e, p11e.PinLocked):
        return KeyStoreLockedError(
            f"the user PIN of the PKCS#11 token {where} is locked",
            hint="unlock it with the SO PIN (pkcs11-tool --module M --login --login-type so --init-pin)",
        )
    if isinstance(e, p11e.PinIncorrect):
        return KeyStoreLockedError(
            f"wrong PIN for the PKCS#11 token {where}",
            hint=(
                "the next wrong PIN locks the token; unlocking it needs the SO PIN"
                if final_try
                else "check pin-source / pin-value in the PKCS#11 URI; repeated failures lock the token"
            ),
        )
    if isinstance(e, p11e.PinExpired):
        return KeyStoreLockedError(f"the PIN of the PKCS#11 token {where} has expired", hint="set a new PIN")
    if isinstance(e, p11e.PinInvalid | p11e.PinLenRange):
        return KeyStoreLockedError(
            f"the PIN given for the PKCS#11 token {where} is not a valid PIN for it",
            hint="check pin-source / pin-value in the PKCS#11 URI",
        )
    if isinstance(e, p11e.UserPinNotInitialized):
        return KeyStoreError(
            f"the PKCS#11 token {where} has no user PIN yet", hint="initialise the user PIN with the SO PIN"
        )
    return KeyStoreError(f"cannot log in to the PKCS#11 token {where}: {type(e).__name__}")


class _TokenSession:
    """Warden's one session on one token, shared by every key store in this process that names the token.

    PKCS#11 keeps the login per application and token, not per session (PKCS#11 v2.40 section 5.6): a second
    C_Login fails with CKR_USER_ALREADY_LOGGED_IN and C_Logout on any session logs all of them out. With a
    session for each key store, one store's close() would log the others out, after which their searches
    silently find no private keys. So stores on one token share one logged-in session, serialised by its
    lock, and the last store to close ends it.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lib: _pkcs11.lib | None = None
        self.session: Session | None = None
        self.users = 0
        # Private key objects by CKA_ID; object handles are valid for the current session only.
        self.handles: dict[bytes, SignMixin] = {}

    def current(self) -> Session | None:
        """The session, unless the module it came from was finalised (pkcs11.unload) since it was opened."""
        if self.session is not None and self.lib is not None and self.lib.initialized:
            return self.session
        self.forget()
        return None

    def forget(self) -> None:
        self.session = None
        self.lib = None
        self.handles.clear()

    def end(self) -> None:
        session, lib = self.session, self.lib
        self.forget()
        if session is not None and lib is not None and lib.initialized:
            # A failure means the session is already gone on the token's side, which is what we wanted.
            with contextlib.suppress(p11e.PKCS11Error):
                session.close()


# Shared sessions by (module path, token serial, token label). Lock order: _SESSIONS_LOCK, then a session's lock.
_SESSIONS: dict[tuple[str, bytes, str], _TokenSession] = {}
_SESSIONS_LOCK = threading.Lock()


class Pkcs11KeyStore:
    """CA keys on a PKCS#11 token. Implements :class:`~warden.pki._keystore.KeyStore`.

    One logged-in read/write session, opened on first use and reused; :meth:`close` releases it. Key stores
    of one process on the same token share that session (see :class:`_TokenSession`), so the PIN of the store
    that opened it is the one that logged in. The PIN comes from ``pin`` if given, else from the URI's
    ``pin-value`` or ``pin-source``. Do not call :meth:`close` while another thread uses the store.
    """

    def __init__(self, uri: Pkcs11Uri, *, pin: str | None = None) -> None:
        self._uri = uri
        self._pin = pin
        self._lock = threading.Lock()  # guards _shared and _shared_key
        self._shared: _TokenSession | None = None
        self._shared_key: tuple[str, bytes, str] | None = None

    def __repr__(self) -> str:
        return f"Pkcs11KeyStore({self._uri.redacted()!r})"

    @property
    def kind(self) -> str:
        return "pkcs11"

    @property
    def uri(self) -> Pkcs11Uri:
        return self._uri

    def describe(self, label: str) -> str:
        where = f"the PKCS#11 token {self._where} (module {self._uri.module_path})"
        return f"key {check_label(label)!r} on {where}"

    @property
    def _where(self) -> str:
        return self._uri.token_name()

    # -- finding the token, sharing its session --------------------------------------------------------------

    def _load_module(self) -> _pkcs11.lib:
        path = self._uri.module_path
        if not os.path.isfile(path):
            raise KeyStoreError(f"the PKCS#11 module {path} does not exist", hint=_MODULE_PATH_HINT)
        try:
            # python-pkcs11 keeps one initialised module per path for the whole process.
            return pkcs11.lib(path)
        except p11e.PKCS11Error as e:
            raise KeyStoreError(
                f"cannot load the PKCS#11 module {path}",
                hint="is it a PKCS#11 module for this platform? (SoftHSM2: check SOFTHSM2_CONF and tokendir)",
                cause=type(e).__name__,
            ) from e

    def _matches(self, lib: _pkcs11.lib, slot: Slot, token: Token) -> bool:
        u = self._uri
        serial = token.serial.decode("ascii", errors="replace").rstrip()
        wanted: list[tuple[object, object]] = [
            (u.token, token.label),
            (u.serial, serial),
            (u.manufacturer, token.manufacturer_id),
            (u.model, token.model),
            (u.slot_id, slot.slot_id),
            (u.slot_description, slot.slot_description),
            (u.slot_manufacturer, slot.manufacturer_id),
            (u.library_manufacturer, lib.manufacturer_id),
            (u.library_description, lib.library_description),
            (u.library_version, lib.library_version),
        ]
        return all(want is None or want == have for want, have in wanted)

    def _find_token(self, lib: _pkcs11.lib) -> Token:
        found: list[Token] = []
        for slot in lib.get_slots(token_present=True):
            try:
                token = slot.get_token()
            except (p11e.TokenNotPresent, p11e.TokenNotRecognised):
                continue
            if self._matches(lib, slot, token):
                found.append(token)
        hint = f"list the tokens with: pkcs11-tool --module {self._uri.module_path} --list-token-slots"
        if not found:
            if self._uri.token:
                raise KeyStoreError(f"no PKCS#11 token labelled {self._uri.token!r}", hint=hint)
            raise KeyStoreError(f"no PKCS#11 token matches {self._uri.redacted()}", hint=hint)
        if len(found) > 1:
            raise KeyStoreError(
                f"{len(found)} PKCS#11 tokens match {self._uri.redacted()}",
                hint="add serial= or slot-id= to the PKCS#11 URI",
            )
        return found[0]

    def _token(self, lib: _pkcs11.lib) -> Token:
        try:
            return self._find_token(lib)
        except p11e.PKCS11Error as e:
            raise KeyStoreError(f"cannot list the tokens of {self._uri.module_path}: {type(e).__name__}") from e

    def _attach(self) -> tuple[_TokenSession, Token | None]:
        """The shared session of our token, registering this store as one of its users on first use."""
        with self._lock:
            if self._shared is not None:
                return self._shared, None
            lib = self._load_module()
            token = self._token(lib)
            key = (self._uri.module_path, token.serial, token.label)
            with _SESSIONS_LOCK:
                shared = _SESSIONS.setdefault(key, _TokenSession())
                shared.users += 1
            self._shared, self._shared_key = shared, key
            return shared, token

    def _login(self, shared: _TokenSession, token: Token | None) -> Session:
        """Open and log in the shared session (its lock held). ``token`` saves a second search if fresh."""
        lib = self._load_module()
        if token is None:
            token = self._token(lib)
        flags = token.flags
        if flags & TokenFlag.USER_PIN_LOCKED:
            raise _login_error(p11e.PinLocked(), self._where, final_try=False)
        pin = self._pin if self._pin is not None else self._uri.read_pin()
        if pin is None:
            raise KeyStoreLockedError(
                f"no PIN for the PKCS#11 token {self._where}",
                hint="add pin-source=file:/path/to/pin to the PKCS#11 URI",
            )
        try:
            session = token.open(rw=True, user_pin=pin)
        except p11e.UserAlreadyLoggedIn:
            # Code outside Warden in this process holds the login; a new session shares it.
            session = self._open_plain(token)
        except p11e.PKCS11Error as e:
            # python-pkcs11 leaves open the session it opened before C_Login failed, and gives us no handle
            # to close it: one leaked session per failed login.
            raise _login_error(e, self._where, final_try=bool(flags & TokenFlag.USER_PIN_FINAL_TRY)) from e
        shared.lib, shared.session = lib, session
        return session

    def _open_plain(self, token: Token) -> Session:
        try:
            return token.open(rw=True)
        except p11e.PKCS11Error as e:
            raise KeyStoreError(f"cannot open a session on the PKCS#11 token {self._where}") from e

    def _run(self, what: str, op: Callable[[Session, dict[bytes, SignMixin]], _T]) -> _T:
        """Run ``op`` on the shared session under its lock; retry once on a fresh session if it went stale."""
        shared, token = self._attach()
        with shared.lock:
            for attempt in range(2):
                session = shared.current()
                if session is None:
                    session = self._login(shared, token)
                token = None  # a retry searches for the token afresh
                try:
                    return op(session, shared.handles)
                except (*_SESSION_GONE, *_LOGIN_GONE) as e:
                    if isinstance(e, _SESSION_GONE):
                        shared.forget()
                    else:
                        shared.end()
                    if attempt:
                        raise KeyStoreError(
                            f"lost the session with the PKCS#11 token {self._where} while {what}",
                            hint="is the token still present?",
                        ) from e
                except p11e.PKCS11Error as e:
                    raise KeyStoreError(
                        f"the PKCS#11 token {self._where} failed while {what}: {type(e).__name__}"
                    ) from e
            raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Release the session; the last key store on the token to close ends it (and the login).

        The key store attaches again if it is used after this.
        """
        with self._lock:
            shared, key = self._shared, self._shared_key
            self._shared = self._shared_key = None
        if shared is None or key is None:
            return
        # Both locks, so no other store can attach to the session being ended.
        with _SESSIONS_LOCK:
            shared.users -= 1
            if shared.users > 0:
                return
            if _SESSIONS.get(key) is shared:
                del _SESSIONS[key]
            with shared.lock:
                shared.end()

    def __enter__(self) -> Pkcs11KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the KeyStore protocol -------------------------------------------------------------------------------

    def exists(self, label: str) -> bool:
        check_label(label)

        def op(session: Session, handles: dict[bytes, SignMixin]) -> bool:
            if _private_keys(session, label):
                return True
            # Without a login private objects are invisible, and a half-finished delete leaves the public half:
            # either way "no such key" would be a lie, and the CA might then generate a new root key.
            if list(session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: label})):
                raise KeyStoreError(
                    f"only the public half of the key {label!r} is on the PKCS#11 token {self._where}",
                    hint="was a delete interrupted? remove the leftover public key, or check the token login",
                )
            return False

        return self._run(f"looking for the key {label!r}", op)

    def generate(self, label: str, algorithm: KeyAlgorithm) -> ec.EllipticCurvePrivateKey:
        check_label(label)

        def op(session: Session, handles: dict[bytes, SignMixin]) -> Pkcs11PrivateKey:
            if list(session.get_objects({Attribute.LABEL: label})):
                raise KeyStoreError(f"a key named {label!r} already exists on the PKCS#11 token {self._where}")
            # A random CKA_ID links the two halves; 16 bytes make a collision with other objects on the token
            # negligible.
            key_id = secrets.token_bytes(16)
            public, private = session.generate_keypair(
                KeyType.EC,
                id=key_id,
                label=label,
                store=True,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                public_template={
                    Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVES[algorithm]),
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: False,
                    Attribute.VERIFY: True,
                },
                private_template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.SIGN: True,
                    Attribute.DERIVE: False,
                    Attribute.DECRYPT: False,
                    Attribute.UNWRAP: False,
                },
            )
            return self._key_object(label, private, public, handles)

        return self._run(f"generating the key {label!r}", op)

    def load(self, label: str) -> ec.EllipticCurvePrivateKey:
        check_label(label)

        def op(session: Session, handles: dict[bytes, SignMixin]) -> Pkcs11PrivateKey:
            found = _private_keys(session, label)
            if not found:
                raise KeyStoreError(
                    f"the key {label!r} is not on the PKCS#11 token {self._where}",
                    hint="was it exported for offline storage and deleted, or is this the wrong token?",
                )
            if len(found) > 1:
                raise KeyStoreError(f"{len(found)} private keys are labelled {label!r} on the PKCS#11 token")
            private = found[0]
            key_id: bytes = private[Attribute.ID]
            publics = list(
                session.get_objects(
                    {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: label, Attribute.ID: key_id}
                )
            )
            if len(publics) != 1 or not isinstance(publics[0], PublicKey):
                raise KeyStoreError(f"the public half of the key {label!r} is missing on the PKCS#11 token")
            return self._key_object(label, private, publics[0], handles)

        return self._run(f"loading the key {label!r}", op)

    def delete(self, label: str) -> None:
        check_label(label)

        def op(session: Session, handles: dict[bytes, SignMixin]) -> None:
            found = _private_keys(session, label)
            if not found:
                raise KeyStoreError(f"the key {label!r} is not on the PKCS#11 token {self._where}")
            if len(found) > 1:
                raise KeyStoreError(f"{len(found)} private keys are labelled {label!r} on the PKCS#11 token")
            key_id: bytes = found[0][Attribute.ID]
            publics = list(
                session.get_objects(
                    {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: label, Attribute.ID: key_id}
                )
            )
            # Private half first: if the token fails half-way, what is left is a harmless public key.
            found[0].destroy()
            for obj in publics:
                obj.destroy()
            handles.pop(key_id, None)

        self._run(f"deleting the key {label!r}", op)

    # -- used by Pkcs11PrivateKey ----------------------------------------------------------------------------

    def _key_object(
        self, label: str, private: Object, public: Object, handles: dict[bytes, SignMixin]
    ) -> Pkcs11PrivateKey:
        """Check the private half honours the invariants and wrap it with its public half."""
        attrs = private.get_attributes([Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.KEY_TYPE])
        if attrs.get(Attribute.KEY_TYPE) != KeyType.EC:
            raise KeyStoreError(f"the key {label!r} on the PKCS#11 token is not an EC key")
        if attrs.get(Attribute.SENSITIVE) is not True or attrs.get(Attribute.EXTRACTABLE) is not False:
            raise KeyStoreError(
                f"the key {label!r} on the PKCS#11 token is extractable; refusing to use it",
                hint="generate CA keys with Warden, on the token, so they are sensitive and non-extractable",
            )
        if not isinstance(public, PublicKey):
            raise KeyStoreError(f"the public half of the key {label!r} is not a public key")
        try:
            loaded = serialization.load_der_public_key(encode_ec_public_key(public))
        except (ValueError, TypeError) as e:
            raise KeyStoreError(f"the public half of the key {label!r} on the PKCS#11 token is malformed") from e
        if not isinstance(loaded, ec.EllipticCurvePublicKey) or not isinstance(
            loaded.curve, ec.SECP256R1 | ec.SECP384R1
        ):
            raise KeyStoreError(f"the key {label!r} on the PKCS#11 token is not a P-256 or P-384 key")
        key_id: bytes = private[Attribute.ID]
        if isinstance(private, SignMixin):
            handles[key_id] = private
        return Pkcs11PrivateKey(self, label, key_id, loaded)

    def _sign_digest(self, label: str, key_id: bytes, digest: bytes) -> bytes:
        """Raw ECDSA (CKM_ECDSA) over a digest; returns r||s as the token gives it."""

        def op(session: Session, handles: dict[bytes, SignMixin]) -> bytes:
            key = handles.get(key_id)
            if key is None:
                found = list(
                    session.get_objects(
                        {
                            Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                            Attribute.LABEL: label,
                            Attribute.ID: key_id,
                        }
                    )
                )
                if len(found) != 1 or not isinstance(found[0], SignMixin):
                    raise KeyStoreError(f"the key {label!r} is no longer on the PKCS#11 token {self._where}")
                key = handles[key_id] = found[0]
            return key.sign(digest, mechanism=Mechanism.ECDSA)

        return self._run(f"signing with the key {label!r}", op)


def _private_keys(session: Session, label: str) -> list[Object]:
    # list(): an unfinished search keeps C_FindObjects active and blocks every other operation on the session.
    return list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}))


class Pkcs11PrivateKey(ec.EllipticCurvePrivateKey):
    """An EC private key that lives in a PKCS#11 token: it signs through the token and cannot be exported.

    Accepted wherever cryptography takes an ``EllipticCurvePrivateKey`` to sign (certificate, CRL and OCSP
    builders).
    """

    def __init__(self, store: Pkcs11KeyStore, label: str, key_id: bytes, public: ec.EllipticCurvePublicKey) -> None:
        self._store = store
        self._label = label
        self._key_id = key_id
        self._public = public

    def __repr__(self) -> str:
        return f"<Pkcs11PrivateKey {self._store.describe(self._label)} {self.curve.name}>"

    @property
    def label(self) -> str:
        return self._label

    @property
    def key_id(self) -> bytes:
        """CKA_ID shared by the private and public halves on the token."""
        return self._key_id

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """ECDSA signature, DER-encoded like cryptography's own keys produce.

        The hash is computed here and the token signs the digest with plain CKM_ECDSA: SoftHSM 2.6 (and some
        HSMs) do not offer CKM_ECDSA_SHA256/384.
        """
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise KeyStoreError("a PKCS#11 EC key signs with ECDSA only")
        if signature_algorithm.deterministic_signing:
            raise KeyStoreError("the PKCS#11 token cannot sign deterministically (RFC 6979)")
        algorithm = signature_algorithm.algorithm
        message = bytes(data)
        if isinstance(algorithm, Prehashed):
            if len(message) != algorithm.digest_size:
                raise KeyStoreError(f"the prehashed digest must be {algorithm.digest_size} bytes")
            # Prehashed does not expose its hash algorithm; the digest size tells SHA-1/MD5 from SHA-2.
            if algorithm.digest_size not in _SIGN_DIGEST_SIZES:
                raise KeyStoreError("refusing to sign a digest shorter than 256 bits", hint="use SHA-256 or longer")
            digest, prehashed = message, algorithm
        else:
            if not isinstance(algorithm, _SIGN_HASHES):
                raise KeyStoreError(f"refusing to sign with {algorithm.name}", hint="use SHA-256, SHA-384 or SHA-512")
            h = hashes.Hash(algorithm)
            h.update(message)
            digest, prehashed = h.finalize(), Prehashed(algorithm)
        n = (self.key_size + 7) // 8
        # ECDSA uses the leftmost bits of the digest up to the order's length (SEC 1, 4.1.3). Some tokens
        # reject a longer input rather than truncate, so truncate here (P-256, P-384 orders are whole bytes).
        raw = self._store._sign_digest(self._label, self._key_id, digest[:n])
        if len(raw) != 2 * n:
            raise KeyStoreError(f"the PKCS#11 token returned a {len(raw)}-byte ECDSA signature, expected {2 * n}")
        signature = encode_dss_signature(int.from_bytes(raw[:n], "big"), int.from_bytes(raw[n:], "big"))
        try:
            self._public.verify(signature, digest, ec.ECDSA(prehashed))
        except InvalidSignature as e:
            raise KeyStoreError(
                f"the signature the PKCS#11 token made with the key {self._label!r} does not verify",
                hint="the key on the token no longer matches its public half; check the token",
            ) from e
        return signature

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise KeyStoreError("the CA key lives in the PKCS#11 token and is for signing only")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise KeyStoreError("the key is non-extractable: it lives in the PKCS#11 token")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        raise KeyStoreError("the key is non-extractable: it lives in the PKCS#11 token")

    def __copy__(self) -> Pkcs11PrivateKey:
        # The object is a handle to a key on the token: a copy is the same key.
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Pkcs11PrivateKey:
        return self
