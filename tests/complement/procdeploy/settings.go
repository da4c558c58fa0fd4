// Package procdeploy runs Synapse homeservers as local processes for Complement.
//
// It replaces Complement's Docker deployer: every homeserver a test asks for
// ("hs1", "hs2", ...) is a `python -m synapse.app.homeserver` process listening
// on a loopback address of its own (127.A.B.2 for hs1, 127.A.B.3 for hs2, ...)
// with the ports Complement's Docker images use: 8008 (client, plain HTTP) and
// 8448 (federation, TLS with a certificate signed by Complement's per-run CA).
//
// Names are made reachable without touching the machine:
//
//   - Complement (this Go process) reaches homeservers through the deployment's
//     RoundTripper and the clients' base URLs, which map "hsN" to its address.
//   - Each Synapse process runs in a private mount namespace (`unshare --mount`)
//     in which a per-deployment hosts file is bind-mounted over /etc/hosts and
//     a resolv.conf pointing at a stub DNS server of ours over /etc/resolv.conf.
//     The hosts file maps hsN and Complement's hostname (host.docker.internal by
//     default) to loopback addresses; the stub answers NXDOMAIN to everything,
//     so Synapse's SRV lookups fail fast and no DNS query leaves the machine.
//     The namespace dies with the process: nothing outlives the run.
//
// See docs/complement.md in the repository for the whole picture.
package procdeploy

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Settings configure a Manager. Fields marked (env) are read by SettingsFromEnv;
// the others come from Complement's own configuration.
type Settings struct {
	// Python is the interpreter of the virtualenv that has matrix-synapse (env:
	// FASTJOIN_COMPLEMENT_PYTHON, required).
	Python string
	// EnableModule adds synapse_fastjoin.FastJoinModule to `modules` (env:
	// FASTJOIN_COMPLEMENT_MODULE=1).
	EnableModule bool
	// Database is "sqlite" (default) or "postgres" (env: FASTJOIN_COMPLEMENT_DB).
	Database string
	// PostgresDSN is an admin DSN used to create one database per homeserver
	// (env: FASTJOIN_POSTGRES, e.g. postgresql://user:pass@127.0.0.1:5432/postgres).
	PostgresDSN string
	// WorkDir holds every homeserver's data directory, logs and the run's
	// hosts/resolv.conf files (env: FASTJOIN_COMPLEMENT_WORKDIR; default: a new
	// directory under os.TempDir()).
	WorkDir string
	// KeepData keeps data directories of destroyed deployments (env:
	// FASTJOIN_COMPLEMENT_KEEP=1). Logs are always kept in WorkDir.
	KeepData bool
	// ExtraConfigFile is a JSON file deep-merged into every homeserver.yaml
	// (env: FASTJOIN_COMPLEMENT_EXTRA_CONFIG).
	ExtraConfigFile string
	// LogTail is how many lines of a homeserver's log are printed into the test
	// output when a test that used it fails (env: FASTJOIN_COMPLEMENT_LOG_TAIL,
	// default 0: only the log's path is printed).
	LogTail int
	// Subnet forces the loopback /24 used by the run, as "127.A.B" (env:
	// FASTJOIN_COMPLEMENT_SUBNET; default: random).
	Subnet string

	// From Complement's config.
	Namespace          string        // the test package's namespace, e.g. "msc3902"
	CACertPEM          []byte        // Complement's per-run CA certificate
	CAKeyPEM           []byte        // ... and its key: homeserver certificates are signed with it
	ComplementHostname string        // how homeservers reach Complement's own servers
	SpawnTimeout       time.Duration // how long a homeserver may take to become healthy
	Dirty              bool          // COMPLEMENT_ENABLE_DIRTY_RUNS: reuse one deployment
	Debug              bool          // COMPLEMENT_DEBUG
	AlwaysPrintLogs    bool          // COMPLEMENT_ALWAYS_PRINT_SERVER_LOGS
}

// SettingsFromEnv fills the (env) fields of Settings from the environment.
func SettingsFromEnv() (Settings, error) {
	s := Settings{
		Python:          os.Getenv("FASTJOIN_COMPLEMENT_PYTHON"),
		EnableModule:    os.Getenv("FASTJOIN_COMPLEMENT_MODULE") == "1",
		Database:        os.Getenv("FASTJOIN_COMPLEMENT_DB"),
		PostgresDSN:     os.Getenv("FASTJOIN_POSTGRES"),
		WorkDir:         os.Getenv("FASTJOIN_COMPLEMENT_WORKDIR"),
		KeepData:        os.Getenv("FASTJOIN_COMPLEMENT_KEEP") == "1",
		ExtraConfigFile: os.Getenv("FASTJOIN_COMPLEMENT_EXTRA_CONFIG"),
		Subnet:          os.Getenv("FASTJOIN_COMPLEMENT_SUBNET"),
	}
	if s.Python == "" {
		return s, fmt.Errorf("FASTJOIN_COMPLEMENT_PYTHON is not set: it must name the python of a virtualenv with matrix-synapse (scripts/complement sets it)")
	}
	if s.Database == "" {
		s.Database = "sqlite"
	}
	if s.Database != "sqlite" && s.Database != "postgres" {
		return s, fmt.Errorf("FASTJOIN_COMPLEMENT_DB=%q: use sqlite or postgres", s.Database)
	}
	if s.Database == "postgres" && s.PostgresDSN == "" {
		return s, fmt.Errorf("FASTJOIN_COMPLEMENT_DB=postgres needs FASTJOIN_POSTGRES (an admin DSN)")
	}
	if v := os.Getenv("FASTJOIN_COMPLEMENT_LOG_TAIL"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return s, fmt.Errorf("FASTJOIN_COMPLEMENT_LOG_TAIL=%q: want a number of lines", v)
		}
		s.LogTail = n
	}
	return s, nil
}

func (s *Settings) validate() error {
	if s.Python == "" {
		return fmt.Errorf("procdeploy: no Python interpreter configured")
	}
	if _, err := os.Stat(s.Python); err != nil {
		return fmt.Errorf("procdeploy: Python interpreter %s: %w", s.Python, err)
	}
	if len(s.CACertPEM) == 0 || len(s.CAKeyPEM) == 0 {
		return fmt.Errorf("procdeploy: Complement's CA certificate and key are required")
	}
	if s.ComplementHostname == "" {
		return fmt.Errorf("procdeploy: Complement's hostname is required")
	}
	if s.Namespace == "" {
		s.Namespace = "complement"
	}
	if s.SpawnTimeout <= 0 {
		s.SpawnTimeout = 30 * time.Second
	}
	if s.Database == "" {
		s.Database = "sqlite"
	}
	if s.Subnet != "" {
		parts := strings.Split(s.Subnet, ".")
		if len(parts) != 3 || parts[0] != "127" {
			return fmt.Errorf("procdeploy: subnet %q: want 127.A.B", s.Subnet)
		}
		for _, p := range parts[1:] {
			if n, err := strconv.Atoi(p); err != nil || n < 0 || n > 255 {
				return fmt.Errorf("procdeploy: subnet %q: want 127.A.B", s.Subnet)
			}
		}
	}
	if s.WorkDir != "" {
		abs, err := filepath.Abs(s.WorkDir)
		if err != nil {
			return err
		}
		s.WorkDir = abs
	}
	return nil
}
