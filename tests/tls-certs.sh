#!/usr/bin/env bash
# tests/tls-certs.sh DIR: everything the TLS tests need, made with openssl
# (certificates) into DIR, which must exist or is created.  Layout, in the
# shapes each peer reads:
#
#   DIR/ca/           ca-cert.pem ca-key.pem          the CA everything trusts
#   DIR/ca2/          ca-cert.pem ca-key.pem          a second, unrelated CA
#   DIR/server/       ca-cert.pem server-cert.pem server-key.pem
#                     CN=localhost, SAN DNS:localhost IP:127.0.0.1, signed by ca
#                     (nbdkit --tls-certificates=DIR/server; qemu-nbd
#                     tls-creds-x509 dir=DIR/server)
#   DIR/server-other/ same files, CN=otherhost, SAN DNS:otherhost, signed by ca
#   DIR/client/       ca-cert.pem client-cert.pem client-key.pem (libnbd
#                     nbd_set_tls_certificates: CA plus a client certificate)
#   DIR/client-ca/    ca-cert.pem only (libnbd: trusts ca, no client certificate)
#   DIR/client-ca2/   ca-cert.pem of ca2 only (the wrong CA)
#   DIR/client-crl/   ca-cert.pem and ca-crl.pem, which revokes DIR/server's
#                     certificate
#   DIR/psk/keys.psk      alice:<key>        (psktool format; qemu-nbd
#                                             tls-creds-psk dir=DIR/psk)
#   DIR/psk-bad/keys.psk  alice:<other key>  (same user, wrong key)
#   DIR/nbd-server.tls    "certfile = ..." "keyfile = ..." "cacertfile = ..."
#                         lines for nbd-server's [generic] section
#
# Keys are EC P-256 (quick to make; GnuTLS and OpenSSL both take them).
# Leaf certificates carry keyUsage keyEncipherment although an EC key never
# enciphers: qemu-nbd refuses a server certificate without it ("usage does
# not permit key encipherment").  nbd-server reads the per-export key
# force_tls, not the "tlsonly" its man page describes.
set -euo pipefail
dir=${1:?usage: tests/tls-certs.sh DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
command -v openssl > /dev/null || { echo "tls-certs.sh: openssl is not installed" >&2; exit 1; }
cd "$dir"
mkdir -p ca ca2 server server-other client client-ca client-ca2 client-crl psk psk-bad
tmp=$(mktemp -d "$dir/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

key () { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2> /dev/null; chmod 600 "$1"; }

# ca NAME SUBJECT
make_ca () {
  key "$1/ca-key.pem"
  openssl req -x509 -new -key "$1/ca-key.pem" -subj "/CN=$2" -days 3650 -sha256 \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$1/ca-cert.pem" 2> /dev/null
}

# leaf CA_DIR OUT_CERT OUT_KEY CN EXTENSIONS
make_leaf () {
  local ca=$1 cert=$2 k=$3 cn=$4 ext=$5
  key "$k"
  openssl req -new -key "$k" -subj "/O=nbd-rs tests/CN=$cn" -out "$tmp/req.csr" 2> /dev/null
  printf '%b\n' "$ext" > "$tmp/ext.cnf"
  openssl x509 -req -in "$tmp/req.csr" -CA "$ca/ca-cert.pem" -CAkey "$ca/ca-key.pem" \
    -set_serial "0x$(openssl rand -hex 8)" -days 3650 -sha256 \
    -extfile "$tmp/ext.cnf" -out "$cert" 2> /dev/null
}

server_ext () {
  echo "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=$1"
}

make_ca ca "nbd-rs test CA"
make_ca ca2 "nbd-rs unrelated CA"

make_leaf ca server/server-cert.pem server/server-key.pem localhost \
  "$(server_ext 'DNS:localhost,IP:127.0.0.1')"
cp ca/ca-cert.pem server/

make_leaf ca server-other/server-cert.pem server-other/server-key.pem otherhost \
  "$(server_ext 'DNS:otherhost')"
cp ca/ca-cert.pem server-other/

make_leaf ca client/client-cert.pem client/client-key.pem alice \
  "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth"
cp ca/ca-cert.pem client/
cp ca/ca-cert.pem client-ca/
cp ca2/ca-cert.pem client-ca2/

# Every certificate must verify against its CA, or the tests are meaningless.
for c in server/server-cert.pem server-other/server-cert.pem client/client-cert.pem; do
  openssl verify -CAfile ca/ca-cert.pem "$c" > /dev/null
done

# A CRL from ca that revokes the localhost server certificate.
touch "$tmp/index.txt"
echo 1000 > "$tmp/crlnumber"
printf '[ca]\ndefault_ca = test\n[test]\ndatabase = %s\ncrlnumber = %s\ndefault_md = sha256\ndefault_crl_days = 3650\n' \
  "$tmp/index.txt" "$tmp/crlnumber" > "$tmp/ca.cnf"
ca_cmd=(openssl ca -config "$tmp/ca.cnf" -keyfile ca/ca-key.pem -cert ca/ca-cert.pem)
"${ca_cmd[@]}" -revoke server/server-cert.pem 2> /dev/null
"${ca_cmd[@]}" -gencrl -out client-crl/ca-crl.pem 2> /dev/null
cp ca/ca-cert.pem client-crl/
if openssl verify -crl_check -CAfile ca/ca-cert.pem -CRLfile client-crl/ca-crl.pem server/server-cert.pem \
    > /dev/null 2>&1; then
  echo "tls-certs.sh: the CRL does not revoke the server certificate" >&2; exit 1
fi

# PSK files as psktool writes them: user:hexkey.
good=$(openssl rand -hex 32)
bad=$(openssl rand -hex 32)
echo "alice:$good" > psk/keys.psk
echo "alice:$bad" > psk-bad/keys.psk
chmod 600 psk/keys.psk psk-bad/keys.psk

cat > nbd-server.tls <<EOF
certfile = $dir/server/server-cert.pem
keyfile = $dir/server/server-key.pem
cacertfile = $dir/ca/ca-cert.pem
EOF
