//go:build tools

// This file is never compiled (the "tools" build tag is never set). It makes
// `go mod tidy` keep the Complement packages whose tests scripts/complement
// builds (and their test dependencies) in go.mod and go.sum.
package tools

import (
	_ "github.com/matrix-org/complement"
	_ "github.com/matrix-org/complement/tests"
	_ "github.com/matrix-org/complement/tests/msc3902"
)
