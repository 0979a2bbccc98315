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
