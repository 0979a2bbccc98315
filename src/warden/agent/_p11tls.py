"""A TLS client identity whose private key stays in a PKCS#11 token, for Python's own :mod:`ssl`.

``ssl.SSLContext.load_cert_chain`` reads keys from files only. :func:`use_pkcs11_key` instead loads the key through
OpenSSL's ``pkcs11`` ENGINE (libp11, Debian package ``libengine-pkcs11-openssl``) and installs it in the context's
``SSL_CTX`` with ctypes, so every handshake of that context (paho-mqtt, http.client, ...) signs inside the token.

How, and what is checked before anything is called through a raw pointer:

- OpenSSL is reached through the very library Python's ``_ssl`` module is linked with (``ctypes.CDLL(_ssl.__file__)``
  resolves symbols in ``_ssl`` and its dependencies), and only if that library reports the version string
  ``ssl.OPENSSL_VERSION`` reports. The engine must resolve ``OPENSSL_init_crypto`` to the same address, i.e. use the
  same libcrypto; two OpenSSL copies in one process would share no state.
- The ``SSL_CTX*`` is the first field after ``PyObject_HEAD`` in CPython's ``PySSLContext``. It is read there and
  accepted only if ``SSL_CTX_get_options`` and ``SSL_CTX_get_verify_mode`` through it agree with ``context.options``
  and ``context.verify_mode``.
- The chain and the key are first tried on a scratch ``SSL_CTX``: a chain that does not match the key, or a key
  that is not found, leaves the caller's context untouched.
- One ENGINE per PKCS#11 module path, initialised once and kept for the life of the process (finishing it would
  ``C_Finalize`` the module under every other user in the process), guarded by one lock. The OpenSSL error queue
  is drained after every call, so nothing of ours is left for the next ``ssl`` call in the thread.
- The PIN goes to the engine through its ``PIN`` control command, never into a URI, a message, a log or a repr.

Sharing the module with python-pkcs11 (``warden.pki.Pkcs11KeyStore``) in one process. A PKCS#11 module is
initialised once per process, and three things depend on who does it first:

- python-pkcs11 0.10 cannot attach to a module someone else initialised (its ``C_Initialize`` gets
  ``CKR_CRYPTOKI_ALREADY_INITIALIZED`` and ``pkcs11.lib()`` raises); libp11 can.
- python-pkcs11 initialises with no arguments, which tells the module the application will not call it from
  several threads: SoftHSM then turns its locks off, and concurrent handshakes crash the process.
- The login is per process and token. python-pkcs11 logs out when it closes a session it logged in with, which
  also logs the engine out: every handshake after that fails.

So when this module is the first to touch a PKCS#11 module, it takes it over: python-pkcs11 (when installed) loads
it, then it is re-initialised at once with ``CKF_OS_LOCKING_OK`` (nothing is open on it yet), then the engine
attaches and logs in. python-pkcs11's own login then gets ``CKR_USER_ALREADY_LOGGED_IN``, and the key store opens
sessions that never log out. :func:`prepare_pkcs11_module` does this at start-up, before any key exists; without
it, a module python-pkcs11 initialised first is used as it is, with a warning.
"""

from __future__ import annotations

import _ssl
import contextlib
import ctypes
import glob
import importlib
import logging
import os
import platform
import ssl
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warden.core import KeyStoreError, KeyStoreLockedError

__all__ = ["engine_available", "prepare_pkcs11_module", "use_pkcs11_key"]

_log = logging.getLogger("warden.agent.p11tls")

ENGINE_ID = "pkcs11"
ENGINE_PACKAGE = "libengine-pkcs11-openssl"
_INSTALL_HINT = f"apt-get install {ENGINE_PACKAGE}"
_ENGINE_FILE = "pkcs11.so"
# Where distributions put OpenSSL 3 engines, after $OPENSSL_ENGINES and the library's own ENGINESDIR.
_ENGINE_DIR_PATTERNS = (
    "/usr/lib/*/engines-3",
    "/usr/lib64/engines-3",
    "/usr/lib/engines-3",
    "/usr/local/lib*/engines-3",
)
_MODULE_HINT = "e.g. /usr/lib/softhsm/libsofthsm2.so"

# OpenSSL_version() selectors, SSL_CTX_get_verify_mode() bits, packed error codes (OpenSSL 3: bit 31 marks an errno).
_OPENSSL_VERSION = 0
_OPENSSL_ENGINES_DIR = 5
_SSL_VERIFY_PEER = 0x01
_SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 0x02
_ERR_SYSTEM_FLAG = 0x80000000
_ERR_REASON_MASK = 0x7FFFFF
_MAX_ERRORS = 32
# libp11 reports a failed PKCS#11 call as an error of its "PKCS#11 module" library, with the CK_RV as the reason.
_P11_LIB_NAME = "PKCS#11 module"
_LIBP11_LIB_NAME = "libp11"

# PKCS#11 (v2.40) constants.
_CKR_OK = 0x000
_CKR_PIN_INCORRECT = 0x0A0
_CKR_PIN_INVALID = 0x0A1
_CKR_PIN_LEN_RANGE = 0x0A2
_CKR_PIN_EXPIRED = 0x0A3
_CKR_PIN_LOCKED = 0x0A4
_CKR_TOKEN_NOT_PRESENT = 0x0E0
_CKR_TOKEN_NOT_RECOGNIZED = 0x0E1
_CKR_USER_PIN_NOT_INITIALIZED = 0x102
_CKR_CRYPTOKI_NOT_INITIALIZED = 0x190
_CKF_OS_LOCKING_OK = 0x02
_CKF_TOKEN_INITIALIZED = 0x400
_CK_INFO_SIZE = 256  # sizeof(CK_INFO) is 88 on LP64; room to spare
_CK_TOKEN_INFO_SIZE = 512  # sizeof(CK_TOKEN_INFO) is 208 on LP64
_CK_LABEL_SIZE = 32
_CK_TOKEN_FLAGS_OFFSET = 96  # label, manufacturerID, model, serialNumber: 32 + 32 + 16 + 16 bytes
_MAX_SLOTS = 256
# Indexes in CK_FUNCTION_LIST after CK_VERSION (padded to a pointer).
_FN_INITIALIZE, _FN_FINALIZE, _FN_GET_INFO, _FN_GET_SLOT_LIST, _FN_GET_TOKEN_INFO = 0, 1, 2, 4, 6


# -- OpenSSL ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _OsslError:
    code: int
    library: str
    reason: str
    text: str

    @property
    def reason_code(self) -> int:
        return 0 if self.code & _ERR_SYSTEM_FLAG else self.code & _ERR_REASON_MASK


def _text(raw: object) -> str:
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else ""


def _summary(errors: list[_OsslError]) -> str:
    """The OpenSSL errors as one line. No PIN reaches the queue: it goes in through a control command."""
    return "; ".join(e.reason or e.text for e in errors) or "no OpenSSL error recorded"


class _OpenSSL:
    """The libssl/libcrypto functions we call, bound in the library ``_ssl`` is linked with."""

    def __init__(self) -> None:
        implementation = platform.python_implementation()
        if implementation != "CPython":
            raise KeyStoreError(
                f"a PKCS#11 TLS key needs CPython, not {implementation}",
                hint="the key is installed into CPython's ssl.SSLContext structure",
            )
        try:
            self._lib = ctypes.CDLL(_ssl.__file__)
        except (OSError, AttributeError) as e:
            raise KeyStoreError("cannot open the OpenSSL library Python's ssl module uses", cause=str(e)) from None
        vp, cp, ci, cul = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_ulong
        try:
            self.OpenSSL_version = self._fn("OpenSSL_version", cp, ci)
            self.ERR_get_error = self._fn("ERR_get_error", cul)
            self.ERR_clear_error = self._fn("ERR_clear_error", None)
            self.ERR_error_string_n = self._fn("ERR_error_string_n", None, cul, cp, ctypes.c_size_t)
            self.ERR_lib_error_string = self._fn("ERR_lib_error_string", cp, cul)
            self.ERR_reason_error_string = self._fn("ERR_reason_error_string", cp, cul)
            self.SSL_CTX_get_options = self._fn("SSL_CTX_get_options", ctypes.c_uint64, vp)
            self.SSL_CTX_get_verify_mode = self._fn("SSL_CTX_get_verify_mode", ci, vp)
            self.TLS_method = self._fn("TLS_method", vp)
            self.SSL_CTX_new = self._fn("SSL_CTX_new", vp, vp)
            self.SSL_CTX_free = self._fn("SSL_CTX_free", None, vp)
            self.SSL_CTX_use_certificate_chain_file = self._fn("SSL_CTX_use_certificate_chain_file", ci, vp, cp)
            self.SSL_CTX_use_PrivateKey = self._fn("SSL_CTX_use_PrivateKey", ci, vp, vp)
            self.SSL_CTX_check_private_key = self._fn("SSL_CTX_check_private_key", ci, vp)
            self.EVP_PKEY_free = self._fn("EVP_PKEY_free", None, vp)
            self.ENGINE_by_id = self._fn("ENGINE_by_id", vp, cp)
            self.ENGINE_ctrl_cmd_string = self._fn("ENGINE_ctrl_cmd_string", ci, vp, cp, cp, ci)
            self.ENGINE_init = self._fn("ENGINE_init", ci, vp)
            self.ENGINE_free = self._fn("ENGINE_free", ci, vp)
            self.ENGINE_load_private_key = self._fn("ENGINE_load_private_key", vp, vp, cp, vp, vp)
            self.init_crypto_address = ctypes.cast(self._lib.OPENSSL_init_crypto, ctypes.c_void_p).value
        except AttributeError as e:
            raise KeyStoreError(
                "the OpenSSL library Python's ssl module uses lacks a function a PKCS#11 TLS key needs",
                hint="OpenSSL built without ENGINE support cannot load keys from a PKCS#11 token",
                cause=str(e),
            ) from None
        self.version = _text(self.OpenSSL_version(_OPENSSL_VERSION))
        if self.version != ssl.OPENSSL_VERSION:
            raise KeyStoreError(
                f"the OpenSSL library found through Python's ssl module reports {self.version!r}, "
                f"but the ssl module was built against {ssl.OPENSSL_VERSION!r}",
                hint="the PKCS#11 key must be installed through the very library the ssl module uses",
            )

    def _fn(self, name: str, restype: Any, *argtypes: Any) -> ctypes._NamedFuncPointer:
        fn: ctypes._NamedFuncPointer = getattr(self._lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
        return fn

    def engines_dir(self) -> str | None:
        # 'ENGINESDIR: "/usr/lib/x86_64-linux-gnu/engines-3"'
        _, _, quoted = _text(self.OpenSSL_version(_OPENSSL_ENGINES_DIR)).partition(":")
        return quoted.strip().strip('"') or None

    def errors(self) -> list[_OsslError]:
        """Drain this thread's OpenSSL error queue, oldest first."""
        found: list[_OsslError] = []
        for _ in range(_MAX_ERRORS * 8):
            code = int(self.ERR_get_error())
            if not code:
                break
            if len(found) < _MAX_ERRORS:
                buffer = ctypes.create_string_buffer(256)
                self.ERR_error_string_n(code, buffer, len(buffer))
                found.append(
                    _OsslError(
                        code=code,
                        library=_text(self.ERR_lib_error_string(code)),
                        reason=_text(self.ERR_reason_error_string(code)),
                        text=buffer.value.decode("utf-8", errors="replace"),
                    )
                )
        self.ERR_clear_error()
        return found

    def ctrl(self, engine: int, command: str, value: bytes | None) -> bool:
        return int(self.ENGINE_ctrl_cmd_string(engine, command.encode(), value, 0)) == 1


# -- PKCS#11, directly ---------------------------------------------------------------------------------------------


class _CkInitializeArgs(ctypes.Structure):
    _fields_ = (
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    )


class _Cryptoki:
    """The few PKCS#11 calls made here directly, through the module's function list: whether it is initialised,
    re-initialising it with OS locking, and the labels of its tokens. No session, no login."""

    def __init__(self, module: str) -> None:
        ulong, vp = ctypes.c_ulong, ctypes.c_void_p
        try:
            get_function_list = ctypes.CDLL(module).C_GetFunctionList
        except (OSError, AttributeError) as e:
            raise KeyStoreError(
                f"cannot load the PKCS#11 module {module}",
                hint="is it a PKCS#11 module for this platform? (SoftHSM2: check SOFTHSM2_CONF and tokendir)",
                cause=str(e),
            ) from None
        get_function_list.restype = ulong
        get_function_list.argtypes = [ctypes.POINTER(vp)]
        functions = vp()
        if get_function_list(ctypes.byref(functions)) != _CKR_OK or not functions.value:
            raise KeyStoreError(f"the PKCS#11 module {module} did not hand out its function list")
        base = functions.value + ctypes.sizeof(vp)

        def entry(index: int) -> int:
            address = vp.from_address(base + index * ctypes.sizeof(vp)).value
            if not address:
                raise KeyStoreError(f"the PKCS#11 module {module} lacks a standard function")
            return address

        self._initialize = ctypes.CFUNCTYPE(ulong, vp)(entry(_FN_INITIALIZE))
        self._finalize = ctypes.CFUNCTYPE(ulong, vp)(entry(_FN_FINALIZE))
        self._get_info = ctypes.CFUNCTYPE(ulong, vp)(entry(_FN_GET_INFO))
        self._get_slot_list = ctypes.CFUNCTYPE(ulong, ctypes.c_ubyte, ctypes.POINTER(ulong), ctypes.POINTER(ulong))(
            entry(_FN_GET_SLOT_LIST)
        )
        self._get_token_info = ctypes.CFUNCTYPE(ulong, ulong, vp)(entry(_FN_GET_TOKEN_INFO))
        self.module = module

    def initialised(self) -> bool:
        info = ctypes.create_string_buffer(_CK_INFO_SIZE)
        return int(self._get_info(ctypes.cast(info, ctypes.c_void_p))) != _CKR_CRYPTOKI_NOT_INITIALIZED

    def reinitialise_with_os_locking(self) -> None:
        """C_Finalize, then C_Initialize telling the module it will be called from several threads."""
        rv = int(self._finalize(None))
        if rv not in (_CKR_OK, _CKR_CRYPTOKI_NOT_INITIALIZED):
            raise KeyStoreError(f"the PKCS#11 module {self.module} refused C_Finalize (CK_RV {rv:#x})")
        args = _CkInitializeArgs(flags=_CKF_OS_LOCKING_OK)
        rv = int(self._initialize(ctypes.cast(ctypes.byref(args), ctypes.c_void_p)))
        if rv != _CKR_OK:
            # Leave it initialised the way python-pkcs11 had it rather than not at all.
            fallback = int(self._initialize(None))
            _log.warning(
                "the PKCS#11 module %s refused OS locking (CK_RV %#x); concurrent use may be unsafe",
                self.module,
                rv,
            )
            if fallback != _CKR_OK:
                raise KeyStoreError(f"the PKCS#11 module {self.module} cannot be initialised (CK_RV {fallback:#x})")

    def token_labels(self) -> set[str] | None:
        """Labels of the initialised tokens present, or None if the module will not say."""
        ulong = ctypes.c_ulong
        ids = (ulong * _MAX_SLOTS)()
        count = ulong(_MAX_SLOTS)
        if self._get_slot_list(1, ids, ctypes.byref(count)) != _CKR_OK:
            return None
        labels: set[str] = set()
        for slot in ids[: min(count.value, _MAX_SLOTS)]:
            info = ctypes.create_string_buffer(_CK_TOKEN_INFO_SIZE)
            if self._get_token_info(slot, ctypes.cast(info, ctypes.c_void_p)) != _CKR_OK:
                continue
            flags = ulong.from_buffer(info, _CK_TOKEN_FLAGS_OFFSET).value
            if flags & _CKF_TOKEN_INITIALIZED:
                labels.add(info.raw[:_CK_LABEL_SIZE].decode("utf-8", errors="replace").rstrip(" \0"))
        return labels


# -- process-wide state ----------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_OPENSSL: _OpenSSL | None = None
# The initialised ENGINE* (a functional reference, never released) by PKCS#11 module path.
_ENGINES: dict[str, int] = {}
# PKCS#11 modules this module initialised (with OS locking), by path.
_OWNED: set[str] = set()


def _openssl() -> _OpenSSL:
    """The bound library, made once (the caller holds ``_LOCK``)."""
    global _OPENSSL
    if _OPENSSL is None:
        _OPENSSL = _OpenSSL()
    return _OPENSSL


def _engine_candidates(engines_dir: str | None) -> Iterator[Path]:
    env = os.environ.get("OPENSSL_ENGINES")
    if env:
        yield Path(env) / _ENGINE_FILE
    if engines_dir:
        yield Path(engines_dir) / _ENGINE_FILE
    for pattern in _ENGINE_DIR_PATTERNS:
        for directory in sorted(glob.glob(pattern)):
            yield Path(directory) / _ENGINE_FILE


def _engine_path(engines_dir: str | None) -> Path | None:
    return next((c for c in _engine_candidates(engines_dir) if c.is_file()), None)


def engine_available() -> bool:
    """Whether OpenSSL's pkcs11 engine (libp11) is installed where the OpenSSL Python uses looks for it."""
    engines_dir: str | None = None
    with _LOCK, contextlib.suppress(KeyStoreError):
        engines_dir = _openssl().engines_dir()
    return _engine_path(engines_dir) is not None


# -- the SSL_CTX behind an ssl.SSLContext ----------------------------------------------------------------------------


def _ssl_ctx(ossl: _OpenSSL, context: ssl.SSLContext) -> int:
    """The context's ``SSL_CTX*``, after checking it really is one (see the module docstring)."""
    if not isinstance(context, _ssl._SSLContext):
        raise KeyStoreError("a PKCS#11 TLS key can only be installed into an ssl.SSLContext")
    offset = object.__basicsize__  # PyObject_HEAD
    size = ctypes.sizeof(ctypes.c_void_p)
    refuse = KeyStoreError(
        "cannot find OpenSSL's SSL_CTX inside this Python's ssl.SSLContext",
        hint="the PySSLContext layout is not CPython 3.11's; the PKCS#11 TLS key cannot be installed",
    )
    if _ssl._SSLContext.__basicsize__ < offset + size:
        raise refuse
    pointer = ctypes.c_void_p.from_address(id(context) + offset).value
    if not pointer or pointer % size:
        raise refuse
    expected_mode = {
        ssl.CERT_NONE: 0,
        ssl.CERT_OPTIONAL: _SSL_VERIFY_PEER,
        ssl.CERT_REQUIRED: _SSL_VERIFY_PEER | _SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
    }[context.verify_mode]
    options = int(ossl.SSL_CTX_get_options(pointer))
    # The low two bits only: post-handshake authentication adds SSL_VERIFY_POST_HANDSHAKE.
    mode = int(ossl.SSL_CTX_get_verify_mode(pointer)) & (_SSL_VERIFY_PEER | _SSL_VERIFY_FAIL_IF_NO_PEER_CERT)
    if options != int(context.options) or mode != expected_mode:
        raise refuse
    return pointer


# -- the engine ------------------------------------------------------------------------------------------------------


def _load_engine(ossl: _OpenSSL) -> int:
    """A structural reference to a pkcs11 ENGINE (by id, else through the dynamic engine)."""
    path = _engine_path(ossl.engines_dir())
    if path is None:
        raise KeyStoreError(
            f"OpenSSL's pkcs11 engine is not installed (no {_ENGINE_FILE} in the OpenSSL engines directory)",
            hint=_INSTALL_HINT,
        )
    _check_same_libcrypto(ossl, path)
    ossl.ERR_clear_error()
    engine = ossl.ENGINE_by_id(ENGINE_ID.encode())
    if not engine:
        # Not where OpenSSL looks for engines by id: load the file through the dynamic engine.
        engine = ossl.ENGINE_by_id(b"dynamic")
        if engine and not (
            ossl.ctrl(engine, "SO_PATH", os.fsencode(path))
            and ossl.ctrl(engine, "ID", ENGINE_ID.encode())
            and ossl.ctrl(engine, "LIST_ADD", b"1")
            and ossl.ctrl(engine, "LOAD", None)
        ):
            ossl.ENGINE_free(engine)
            engine = None
    # ENGINE_by_id leaves the directories it tried in the queue even when it succeeds.
    errors = ossl.errors()
    if not engine:
        raise KeyStoreError(
            f"OpenSSL cannot load its pkcs11 engine {path}: {_summary(errors)}",
            hint=f"is {ENGINE_PACKAGE} built for {ossl.version}? reinstall it: {_INSTALL_HINT}",
        )
    return int(engine)


def _check_same_libcrypto(ossl: _OpenSSL, path: Path) -> None:
    """Refuse an engine linked with another libcrypto than the one ``_ssl`` uses: they would share no state."""
    try:
        theirs = ctypes.cast(ctypes.CDLL(os.fspath(path)).OPENSSL_init_crypto, ctypes.c_void_p).value
    except (OSError, AttributeError) as e:
        raise KeyStoreError(f"cannot load OpenSSL's pkcs11 engine {path}", hint=_INSTALL_HINT, cause=str(e)) from None
    if theirs != ossl.init_crypto_address:
        raise KeyStoreError(
            f"OpenSSL's pkcs11 engine {path} is linked with another libcrypto than Python's ssl module "
            f"({ossl.version})",
            hint="install the engine built for the OpenSSL Python is linked with",
        )


def _take_module(module: str) -> bool:
    """Initialise ``module`` for sharing, if nobody in the process has (see the module docstring).

    Returns whether it was ours to initialise. python-pkcs11 keeps one initialised module per path *string*, so
    ``module`` must be spelt as the key store's URI spells ``module-path``.
    """
    if module in _OWNED:
        return True
    cryptoki = _Cryptoki(module)
    if cryptoki.initialised():
        return False
    try:
        pkcs11 = importlib.import_module("pkcs11")
    except ImportError:
        pass  # libp11 initialises it, with OS locking
    else:
        try:
            pkcs11.lib(module)
        except Exception as e:  # any python-pkcs11 error
            raise KeyStoreError(f"python-pkcs11 cannot load the PKCS#11 module {module}", cause=type(e).__name__) from e
        cryptoki.reinitialise_with_os_locking()
    _OWNED.add(module)
    return True


def _engine_for(ossl: _OpenSSL, module: str) -> int:
    """The initialised engine for ``module``, made on first use (the caller holds ``_LOCK``)."""
    engine = _ENGINES.get(module)
    if engine is not None:
        return engine
    engine = _load_engine(ossl)
    try:
        ours = _take_module(module)
    except BaseException:
        ossl.ENGINE_free(engine)
        raise
    # libp11 prints its diagnostics to stderr unless told to be quiet (libp11 0.4.10 and later); ours come from
    # the error queue.
    ossl.ctrl(engine, "QUIET", None)
    ok = ossl.ctrl(engine, "MODULE_PATH", os.fsencode(module)) and int(ossl.ENGINE_init(engine)) == 1
    errors = ossl.errors()
    if not ok:
        ossl.ENGINE_free(engine)
        raise KeyStoreError(f"OpenSSL's pkcs11 engine refused the PKCS#11 module {module}: {_summary(errors)}")
    _ENGINES[module] = engine
    if not ours:
        _log.warning(
            "the PKCS#11 module %s was initialised before OpenSSL's pkcs11 engine (by python-pkcs11?): "
            "concurrent handshakes may be unsafe, and closing a key store that logged in logs the engine out; "
            "call prepare_pkcs11_module() before any other use of the module",
            module,
        )
    return engine


def _uri(token: str, label: str) -> bytes:
    """RFC 7512 URI of the private key, percent-encoded (libp11 decodes it). Never holds the PIN."""

    def enc(value: str) -> str:
        return urllib.parse.quote(value, safe="")

    return f"pkcs11:token={enc(token)};object={enc(label)};type=private".encode()


def _load_key(ossl: _OpenSSL, engine: int, module: str, token: str, label: str, pin: str) -> int | None:
    """ENGINE_load_private_key; None if the token has no such key. Logs the engine in first if needed."""
    where = _where(token, module)
    ossl.ERR_clear_error()
    if not ossl.ctrl(engine, "PIN", pin.encode()):
        raise KeyStoreError(f"OpenSSL's pkcs11 engine did not take the PIN for {where}: {_summary(ossl.errors())}")
    key = ossl.ENGINE_load_private_key(engine, _uri(token, label), None, None)
    errors = ossl.errors()
    if key:
        return int(key)
    rvs = {e.reason_code for e in errors if e.library == _P11_LIB_NAME}
    if _CKR_PIN_INCORRECT in rvs:
        raise KeyStoreLockedError(
            f"wrong PIN for {where}",
            hint="check the PIN; repeated failures lock the token (unlocking needs the SO PIN)",
        )
    if _CKR_PIN_LOCKED in rvs:
        raise KeyStoreLockedError(f"the user PIN of {where} is locked", hint="unlock it with the SO PIN")
    if rvs & {_CKR_PIN_INVALID, _CKR_PIN_LEN_RANGE}:
        raise KeyStoreLockedError(f"the PIN given for {where} is not a valid PIN for it")
    if _CKR_PIN_EXPIRED in rvs:
        raise KeyStoreLockedError(f"the PIN of {where} has expired", hint="set a new PIN")
    if _CKR_USER_PIN_NOT_INITIALIZED in rvs:
        raise KeyStoreError(f"{where} has no user PIN yet", hint="initialise the user PIN with the SO PIN")
    if rvs & {_CKR_TOKEN_NOT_PRESENT, _CKR_TOKEN_NOT_RECOGNIZED}:
        raise KeyStoreError(f"{where} is not present")
    if any(e.library == _LIBP11_LIB_NAME for e in errors) or not any(e.reason == "object not found" for e in errors):
        raise KeyStoreError(f"OpenSSL's pkcs11 engine cannot load the key {label!r} from {where}: {_summary(errors)}")
    # libp11 says "object not found" both for a missing token and for a missing key.
    labels = _Cryptoki(module).token_labels()
    if labels is not None and token not in labels:
        present = ", ".join(repr(x) for x in sorted(labels)) or "none"
        raise KeyStoreError(
            f"no PKCS#11 token labelled {token!r} in the module {module} (tokens: {present})",
            hint=f"list the tokens with: pkcs11-tool --module {module} --list-token-slots",
        )
    return None


def _where(token: str, module: str) -> str:
    return f"the PKCS#11 token {token!r} (module {module})"


def _install(ossl: _OpenSSL, target: int, key: int, chain: Path, label: str, where: str) -> None:
    """Try the chain and key on a scratch SSL_CTX, then install them in ``target``."""
    chain_path = os.fsencode(chain)
    scratch = ossl.SSL_CTX_new(ossl.TLS_method())
    if not scratch:
        raise KeyStoreError(f"OpenSSL cannot make an SSL_CTX: {_summary(ossl.errors())}")
    try:
        if int(ossl.SSL_CTX_use_certificate_chain_file(scratch, chain_path)) != 1:
            raise KeyStoreError(
                f"cannot read the certificate chain {chain}: {_summary(ossl.errors())}",
                hint="it must be PEM, the device certificate first",
            )
        if int(ossl.SSL_CTX_use_PrivateKey(scratch, key)) != 1 or int(ossl.SSL_CTX_check_private_key(scratch)) != 1:
            raise KeyStoreError(
                f"the certificate in {chain} does not match the private key {label!r} on {where}",
                hint="the certificate was issued for another key; request one for this key",
                cause=_summary(ossl.errors()),
            )
    finally:
        ossl.SSL_CTX_free(scratch)
    if (
        int(ossl.SSL_CTX_use_certificate_chain_file(target, chain_path)) != 1
        or int(ossl.SSL_CTX_use_PrivateKey(target, key)) != 1
        or int(ossl.SSL_CTX_check_private_key(target)) != 1
    ):
        raise KeyStoreError(f"cannot install the PKCS#11 key {label!r} in the TLS context: {_summary(ossl.errors())}")


def _check_args(module: Path, token: str, pin: str) -> str:
    module_path = os.fspath(module)
    if not os.path.isfile(module_path):
        raise KeyStoreError(f"the PKCS#11 module {module_path} does not exist", hint=_MODULE_HINT)
    if not token:
        raise KeyStoreError("no PKCS#11 token label given for the TLS key")
    if not pin:
        raise KeyStoreLockedError(f"no PIN given for the PKCS#11 token {token!r}")
    if "\0" in pin:
        raise KeyStoreLockedError(f"the PIN given for the PKCS#11 token {token!r} holds a NUL character")
    return module_path


# -- the public functions --------------------------------------------------------------------------------------------


def prepare_pkcs11_module(*, module: Path, token: str, pin: str) -> None:
    """Set the PKCS#11 module up for the engine and python-pkcs11 to share, and log the engine in to ``token``.

    Call it at start-up, before anything else in the process (python-pkcs11 included) uses the module; then key
    stores and TLS keys work in any order and from any thread (see the module docstring). Idempotent.
    """
    module_path = _check_args(module, token, pin)
    with _LOCK:
        ossl = _openssl()
        engine = _engine_for(ossl, module_path)
        # Loading any private key makes libp11 log in first; this label is not expected to exist.
        key = _load_key(ossl, engine, module_path, token, "warden-p11tls-login-probe", pin)
        if key is not None:
            ossl.EVP_PKEY_free(key)


def use_pkcs11_key(context: ssl.SSLContext, *, chain: Path, module: Path, token: str, key_label: str, pin: str) -> None:
    """Install the certificate chain (PEM file, leaf first) and the token's private key `key_label` as the context's
    TLS client identity."""
    module_path = _check_args(module, token, pin)
    if not key_label:
        raise KeyStoreError("no key label given for the TLS key on the PKCS#11 token")
    if not os.path.isfile(chain):
        raise KeyStoreError(f"the certificate chain {chain} does not exist")
    where = _where(token, module_path)
    with _LOCK:
        ossl = _openssl()
        target = _ssl_ctx(ossl, context)
        engine = _engine_for(ossl, module_path)
        key = _load_key(ossl, engine, module_path, token, key_label, pin)
        if key is None:
            raise KeyStoreError(
                f"the private key {key_label!r} is not on {where}",
                hint=f"list the keys with: pkcs11-tool --module {module_path} --token-label {token} --login -O",
            )
        try:
            _install(ossl, target, key, chain, key_label, where)
        finally:
            ossl.EVP_PKEY_free(key)  # the context holds its own reference
            ossl.errors()
