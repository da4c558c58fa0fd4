package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// stream writes test2json lines for leaf tests (name -> "pass", "fail" or "skip").
func stream(t *testing.T, dir, file string, results map[string]string) string {
	t.Helper()
	var b strings.Builder
	for name, result := range results {
		b.WriteString(`{"Action":"run","Package":"msc3902","Test":"` + name + `"}` + "\n")
		if result == "fail" {
			b.WriteString(`{"Action":"output","Package":"msc3902","Test":"` + name + `","Output":"    x_test.go:1: timed out\n"}` + "\n")
		}
		b.WriteString(`{"Action":"` + result + `","Package":"msc3902","Test":"` + name + `","Elapsed":1}` + "\n")
	}
	path := filepath.Join(dir, file)
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// summarize runs `summarize` with args into a file of dir and reads it back.
func summarize(t *testing.T, dir string, args ...string) *Run {
	t.Helper()
	out := filepath.Join(dir, "out.json")
	if err := cmdSummarize(append(args, "-out", out)); err != nil {
		t.Fatal(err)
	}
	r, err := readRun(out)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestRetryPassesOnlyWhatPassedAgain(t *testing.T) {
	dir := t.TempDir()
	first := stream(t, dir, "first.json", map[string]string{"T/a": "pass", "T/b": "fail", "T/c": "fail", "T/d": "fail", "T/e": "skip"})
	// (T/e is not retried; were it run again and passed, it stays skipped.)
	again := stream(t, dir, "again.json", map[string]string{"T/b": "pass", "T/c": "fail", "T/e": "pass"})
	r := summarize(t, dir, "-in", first, "-retry", again)
	if r.Passed != 2 || r.Failed != 2 || r.Skipped != 1 || r.PassedOnRetry != 1 {
		t.Fatalf("passed %d, failed %d, on retry %d", r.Passed, r.Failed, r.PassedOnRetry)
	}
	byName := map[string]Result{}
	for _, res := range r.Tests {
		byName[res.Test] = res
	}
	if b := byName["T/b"]; b.Result != "pass" || !b.Retried || !strings.Contains(b.Reason, "timed out") {
		t.Fatalf("T/b: %+v", b)
	}
	// Failed again, or not run again: still failed.
	for _, name := range []string{"T/c", "T/d"} {
		if res := byName[name]; res.Result != "fail" || res.Retried {
			t.Fatalf("%s: %+v", name, res)
		}
	}
	if a := byName["T/a"]; a.Result != "pass" || a.Retried {
		t.Fatalf("T/a: %+v", a)
	}
	if e := byName["T/e"]; e.Result != "skip" || e.Retried {
		t.Fatalf("T/e: %+v", e)
	}
}

func TestWithoutRetryNothingChanges(t *testing.T) {
	dir := t.TempDir()
	first := stream(t, dir, "first.json", map[string]string{"T/a": "pass", "T/b": "fail"})
	r := summarize(t, dir, "-in", first)
	if r.Passed != 1 || r.Failed != 1 || r.PassedOnRetry != 0 {
		t.Fatalf("passed %d, failed %d, on retry %d", r.Passed, r.Failed, r.PassedOnRetry)
	}
}
