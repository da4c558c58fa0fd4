package procdeploy

import (
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
)

const (
	clientPort     = 8008 // as in Complement's Docker images
	federationPort = 8448 // the default Matrix federation port: server names carry no port
)

func limit(perSecond, burst int) map[string]any {
	return map[string]any{"per_second": perSecond, "burst_count": burst}
}

// homeserverConfig is the homeserver.yaml of one homeserver. It follows what
// Synapse's Complement image sets (docker/complement/conf/
// workers-shared-extra.yaml.j2 in Synapse): registration open with the shared
// secret "complement", Complement's CA trusted for federation, no IP range
// blocked, very high rate limits, no key notary, no sync response cache, public
// room list open. It is written as JSON, which YAML parsers read as YAML.
func homeserverConfig(hs *Homeserver, s *Settings, db map[string]any) map[string]any {
	ip := hs.IP
	cfg := map[string]any{
		"server_name":      hs.Name,
		"public_baseurl":   fmt.Sprintf("http://%s:%d/", ip, clientPort),
		"pid_file":         filepath.Join(hs.Dir, "homeserver.pid"),
		"report_stats":     false,
		"enable_metrics":   false,
		"signing_key_path": filepath.Join(hs.Dir, "signing.key"),
		"log_config":       filepath.Join(hs.Dir, "log.yaml"),
		"media_store_path": filepath.Join(hs.Dir, "media_store"),
		"database":         db,
		"listeners": []any{
			map[string]any{
				"port": clientPort, "bind_addresses": []string{ip}, "type": "http", "tls": false,
				"x_forwarded": false,
				"resources":   []any{map[string]any{"names": []string{"client", "federation"}, "compress": false}},
			},
			map[string]any{
				"port": federationPort, "bind_addresses": []string{ip}, "type": "http", "tls": true,
				"x_forwarded": false,
				"resources":   []any{map[string]any{"names": []string{"federation"}, "compress": false}},
			},
		},
		"tls_certificate_path": filepath.Join(hs.Dir, "tls.crt"),
		"tls_private_key_path": filepath.Join(hs.Dir, "tls.key"),

		// Registration (Complement registers users with m.login.dummy, admins
		// with the shared secret).
		"enable_registration":                      true,
		"enable_registration_without_verification": true,
		"registration_shared_secret":               "complement",
		"bcrypt_rounds":                            4,
		"macaroon_secret_key":                      hs.secret("macaroon"),
		"form_secret":                              hs.secret("form"),

		// Federation: trust Complement's CA, allow loopback, no notary.
		"federation_verify_certificates":           true,
		"federation_custom_ca_list":                []string{filepath.Join(hs.Dir, "complement-ca.crt")},
		"federation_ip_range_blacklist":            []string{},
		"ip_range_whitelist":                       []string{"127.0.0.0/8", "::1/128"},
		"trusted_key_servers":                      []any{},
		"suppress_key_server_warning":              true,
		"allow_device_name_lookup_over_federation": true,

		// Rate limits, as in Synapse's Complement image.
		"rc_federation": map[string]any{
			"window_size": 1000, "sleep_limit": 10, "sleep_delay": 500, "reject_limit": 99999, "concurrent": 3,
		},
		"rc_message":      limit(9999, 9999),
		"rc_registration": limit(9999, 9999),
		"rc_login": map[string]any{
			"address": limit(9999, 9999), "account": limit(9999, 9999), "failed_attempts": limit(9999, 9999),
		},
		"rc_admin_redaction": limit(9999, 9999),
		"rc_joins":           map[string]any{"local": limit(9999, 9999), "remote": limit(9999, 9999)},
		"rc_joins_per_room":  limit(9999, 9999),
		"rc_3pid_validation": limit(1000, 1000),
		"rc_invites": map[string]any{
			"per_room": limit(1000, 1000), "per_user": limit(1000, 1000), "per_issuer": limit(1000, 1000),
		},
		"rc_presence":           map[string]any{"per_user": limit(9999, 9999)},
		"rc_delayed_event_mgmt": limit(9999, 9999),
		"rc_room_creation":      limit(9999, 9999),
		"rc_user_directory":     limit(9999, 9999),
		"rc_media_create":       limit(9999, 9999),
		"rc_key_requests":       limit(9999, 9999),
		"rc_profile":            limit(9999, 9999),
		"rc_reports":            limit(9999, 9999),
		"federation_rr_transactions_per_room_per_second": 9999,

		// Complement assumes fresh /sync results and an open room directory.
		"caches":                      map[string]any{"sync_response_cache_duration": 0},
		"room_list_publication_rules": []any{map[string]any{"action": "allow"}},

		// The experimental features Synapse's Complement image turns on; keys
		// this Synapse does not know are ignored.
		"experimental_features": map[string]any{
			"msc3381_polls_enabled":              true,
			"msc3890_enabled":                    true,
			"msc3391_enabled":                    true,
			"msc3874_enabled":                    true,
			"msc3967_enabled":                    true,
			"msc2409_to_device_messages_enabled": true,
			"msc3202_device_masquerading":        true,
			"msc3202_transaction_extensions":     true,
			"msc3983_appservice_otk_claims":      true,
			"msc3984_appservice_key_query":       true,
			"msc4155_enabled":                    true,
			"msc4306_enabled":                    true,
			"msc4354_enabled":                    true,
			"msc4222_enabled":                    true,
		},
		"max_event_delay_duration": "24h",

		// Version skew: the pinned Complement's gomatrixserverlib knows room
		// versions up to 10, Synapse 1.163 defaults to 12. Tests create rooms in
		// the version /capabilities reports as default, so report 10 (Synapse's
		// default when that Complement was current).
		"default_room_version": "10",
	}
	if s.EnableModule {
		cfg["modules"] = []any{map[string]any{"module": "synapse_fastjoin.FastJoinModule", "config": map[string]any{}}}
	}
	return cfg
}

func logConfig(hs *Homeserver) map[string]any {
	return map[string]any{
		"version":                  1,
		"disable_existing_loggers": false,
		"formatters": map[string]any{
			"precise": map[string]any{
				"format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s",
			},
		},
		"handlers": map[string]any{
			"file": map[string]any{
				"class": "logging.FileHandler", "formatter": "precise",
				"filename": hs.LogPath, "encoding": "utf8",
			},
		},
		"loggers": map[string]any{
			"synapse.storage.SQL": map[string]any{"level": "INFO"},
			"synapse_fastjoin":    map[string]any{"level": "DEBUG"},
		},
		"root": map[string]any{"level": "INFO", "handlers": []string{"file"}},
	}
}

// mergeConfig deep-merges extra into base (maps key by key; anything else,
// lists included, replaces; a JSON null removes the key).
func mergeConfig(base, extra map[string]any) map[string]any {
	for k, v := range extra {
		if v == nil {
			delete(base, k)
			continue
		}
		if em, ok := v.(map[string]any); ok {
			if bm, ok := base[k].(map[string]any); ok {
				base[k] = mergeConfig(bm, em)
				continue
			}
		}
		base[k] = v
	}
	return base
}

func readExtraConfig(path string) (map[string]any, error) {
	if path == "" {
		return nil, nil
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var extra map[string]any
	if err := json.Unmarshal(raw, &extra); err != nil {
		return nil, fmt.Errorf("%s: %w (the extra config must be a JSON object)", path, err)
	}
	return extra, nil
}

func writeJSON(path string, v any) error {
	raw, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(raw, '\n'), 0o644)
}

// pgParams turns an admin DSN (postgresql://user:pass@host:port/db) into
// psycopg2 connection arguments for database `dbName`.
func pgParams(dsn, dbName string) (map[string]any, error) {
	u, err := url.Parse(dsn)
	if err != nil || (u.Scheme != "postgresql" && u.Scheme != "postgres") {
		return nil, fmt.Errorf("FASTJOIN_POSTGRES=%q: want postgresql://user:pass@host:port/db", dsn)
	}
	args := map[string]any{"database": dbName, "cp_min": 1, "cp_max": 5}
	if u.User != nil {
		args["user"] = u.User.Username()
		if p, ok := u.User.Password(); ok {
			args["password"] = p
		}
	}
	if h := u.Hostname(); h != "" {
		args["host"] = h
	}
	if p := u.Port(); p != "" {
		args["port"] = p
	}
	return args, nil
}

// pgAdminSQL runs one statement (outside a transaction) on the admin DSN with
// the homeserver venv's psycopg2, so the Go side needs no database driver.
func pgAdminSQL(python, dsn, sql string) error {
	script := strings.Join([]string{
		"import sys, psycopg2",
		"c = psycopg2.connect(sys.argv[1])",
		"c.autocommit = True",
		"c.cursor().execute(sys.argv[2])",
		"c.close()",
	}, "\n")
	return runQuiet(python, "-c", script, dsn, sql)
}
