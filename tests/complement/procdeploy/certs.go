package procdeploy

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"time"
)

// certAuthority is Complement's per-run CA, parsed.
type certAuthority struct {
	cert    *x509.Certificate
	key     crypto.Signer
	certPEM []byte
}

func parseCA(certPEM, keyPEM []byte) (*certAuthority, error) {
	cb, _ := pem.Decode(certPEM)
	if cb == nil {
		return nil, fmt.Errorf("CA certificate: no PEM block")
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("CA certificate: %w", err)
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil {
		return nil, fmt.Errorf("CA key: no PEM block")
	}
	var key crypto.Signer
	switch kb.Type {
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(kb.Bytes)
	default:
		var k any
		k, err = x509.ParsePKCS8PrivateKey(kb.Bytes)
		if err == nil {
			var ok bool
			if key, ok = k.(crypto.Signer); !ok {
				err = fmt.Errorf("unsupported key type %T", k)
			}
		}
	}
	if err != nil {
		return nil, fmt.Errorf("CA key: %w", err)
	}
	if _, ok := key.(*rsa.PrivateKey); !ok {
		if _, ok := key.(*ecdsa.PrivateKey); !ok {
			return nil, fmt.Errorf("CA key: unsupported type %T", key)
		}
	}
	return &certAuthority{cert: cert, key: key, certPEM: certPEM}, nil
}

// issue writes a key and a certificate for `dnsName` (and `ip`) signed by the
// CA, as PEM files. Homeservers serve federation with them, so peers that
// trust Complement's CA (other homeservers, via federation_custom_ca_list)
// verify them as they would in Complement's Docker images.
func (ca *certAuthority) issue(dnsName string, ip net.IP, certPath, keyPath string) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: dnsName, Organization: []string{"synapse-fastjoin complement"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(7 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		DNSNames:              []string{dnsName},
	}
	if ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return err
	}
	return os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

// writeSigningKey writes a Synapse signing key file ("ed25519 <version>
// <unpadded base64 seed>") unless it exists already (kept across restarts).
func writeSigningKey(path string) error {
	if _, err := os.Stat(path); err == nil {
		return nil
	}
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return err
	}
	var ver [2]byte
	if _, err := rand.Read(ver[:]); err != nil {
		return err
	}
	line := fmt.Sprintf("ed25519 a_%x %s\n", ver[:], base64.RawStdEncoding.EncodeToString(priv.Seed()))
	return os.WriteFile(path, []byte(line), 0o600)
}
