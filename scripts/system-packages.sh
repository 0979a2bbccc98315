#!/usr/bin/env bash
# Installs the system packages Warden needs when they are missing: as root on Debian/Ubuntu through apt-get,
# otherwise it says what to install and fails.
set -euo pipefail

declare -A need=(
  [openssl]=openssl
  [softhsm2-util]=softhsm2
  [mosquitto]=mosquitto
  [mosquitto_pub]=mosquitto-clients
)
missing=()
for cmd in "${!need[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$cmd" ] && ! [ -x "/usr/bin/$cmd" ]; then
    missing+=("${need[$cmd]}")
  fi
done
if [ ! -e /usr/lib/softhsm/libsofthsm2.so ] && [[ ! " ${missing[*]} " =~ " softhsm2 " ]]; then
  missing+=(softhsm2)
fi
# The OpenSSL pkcs11 engine (libp11) is a library, not a command: look for the engine file in OpenSSL's
# ENGINESDIR (the multiarch path on Debian/Ubuntu).
engines_dir=$(openssl version -e 2>/dev/null | sed -n 's/^ENGINESDIR: "\(.*\)"$/\1/p' || true)
if [ ! -e "${engines_dir:-/nonexistent}/pkcs11.so" ] \
  && ! compgen -G "/usr/lib/*/engines-3/pkcs11.so" >/dev/null \
  && [ ! -e /usr/lib/engines-3/pkcs11.so ]; then
  missing+=(libengine-pkcs11-openssl)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

echo "system packages missing: ${missing[*]}"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  echo "installed: ${missing[*]}"
else
  echo "install them with: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
