#!/usr/bin/env bash
# Makes a throw-away X.509 CA and certificates for NBD over TLS, with openssl, in the layouts
# that nbdkit/userdm (server) and libnbd/qemu/userdm (client) read:
#
#   DIR/server/  ca-cert.pem server-cert.pem server-key.pem   (userdm daemon --tls-certificates DIR/server)
#   DIR/client/  ca-cert.pem client-cert.pem client-key.pem   (nbds://...?tls-certificates=DIR/client,
#                                                              qemu --object tls-creds-x509,dir=DIR/client,endpoint=client)
#   DIR/ca/      ca-cert.pem ca-key.pem                       (the CA, to sign more)
#
# The server certificate names localhost, 127.0.0.1 and ::1 (plus HOST... if given).
# For tests and trials only: keys are unencrypted. Usage: tls-certs.sh DIR [HOST...]
set -euo pipefail
dir=${1:?usage: tls-certs.sh DIR [HOST...]}
shift
mkdir -p "$dir/ca" "$dir/server" "$dir/client"
umask 077
days=3650
key() { openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1" 2>/dev/null; }

key "$dir/ca/ca-key.pem"
openssl req -x509 -new -key "$dir/ca/ca-key.pem" -out "$dir/ca/ca-cert.pem" -days $days \
  -subj "/O=userdm/CN=userdm test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for h in "$@"; do
  if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then san+=",IP:$h"; else san+=",DNS:$h"; fi
done

# sign NAME CN EXTENDED_USAGE [SAN]
sign() {
  local out=$1 cn=$2 eku=$3 alt=${4:-}
  key "$out-key.pem"
  openssl req -new -key "$out-key.pem" -out "$out.csr" -subj "/O=userdm/CN=$cn"
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [ -n "$alt" ] && echo "subjectAltName=$alt"
  } > "$out.ext"
  openssl x509 -req -in "$out.csr" -CA "$dir/ca/ca-cert.pem" -CAkey "$dir/ca/ca-key.pem" \
    -CAcreateserial -days $days -out "$out-cert.pem" -extfile "$out.ext" 2>/dev/null
  rm -f "$out.csr" "$out.ext"
}
sign "$dir/server/server" localhost serverAuth "$san"
sign "$dir/client/client" "userdm client" clientAuth
cp "$dir/ca/ca-cert.pem" "$dir/server/ca-cert.pem"
cp "$dir/ca/ca-cert.pem" "$dir/client/ca-cert.pem"
rm -f "$dir/ca/ca-cert.srl"
chmod 0644 "$dir"/*/ca-cert.pem "$dir"/*/*-cert.pem
echo "$dir"
