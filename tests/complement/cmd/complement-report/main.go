// Command complement-report turns `go test -json` (test2json) output of
// Complement runs into compact result files and the results table of
// docs/complement.md.
//
//	complement-report summarize -in run.json -variant patched -db sqlite \
//	    -complement VERSION -synapse VERSION -duration SECONDS -out results/patched-sqlite.json
//	    [-retry retry.json]   # tests that failed in -in and passed in -retry: passed on a retry
//	complement-report summary results/patched-sqlite.json   # counts + failures; exit 1 on failure
//	complement-report failed results/patched-sqlite.json    # the failed tests, one "package test" a line
//	complement-report table -doc docs/complement.md results/stock-sqlite.json results/patched-sqlite.json
//	complement-report progress -follow run.json -pid PID   # one line per finished test while PID runs
//
// Only leaf tests (tests without subtests) are counted and listed.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"sort"
	"strings"
	"time"
)

// event is one line of test2json output.
type event struct {
	Time    time.Time
	Action  string
	Package string
	Test    string
	Elapsed float64
	Output  string
}

// Result is one leaf test's outcome.
type Result struct {
	Package string  `json:"package"`
	Test    string  `json:"test"`
	Result  string  `json:"result"` // pass, fail, skip
	Elapsed float64 `json:"elapsed_s"`
	Reason  string  `json:"reason,omitempty"` // skip reason, or first failure lines
	// Failed, then passed when run again alone (scripts/complement --ci runs
	// each failed test once more); Reason keeps the first failure.
	Retried bool `json:"passed_on_retry,omitempty"`
}

// Run is a compact record of one run (one Synapse variant and database).
type Run struct {
	Variant           string   `json:"variant"`
	Database          string   `json:"database"`
	ComplementVersion string   `json:"complement_version"`
	SynapseVersion    string   `json:"synapse_version"`
	Started           string   `json:"started"`
	DurationS         float64  `json:"duration_s"`
	Selection         string   `json:"selection"`
	Passed            int      `json:"passed"`
	Failed            int      `json:"failed"`
	Skipped           int      `json:"skipped"`
	PassedOnRetry     int      `json:"passed_on_retry,omitempty"`
	Incomplete        []string `json:"incomplete,omitempty"` // started, never finished (timeout/crash)
	Tests             []Result `json:"tests"`
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "summarize":
		err = cmdSummarize(os.Args[2:])
	case "summary":
		err = cmdSummary(os.Args[2:])
	case "failed":
		err = cmdFailed(os.Args[2:])
	case "table":
		err = cmdTable(os.Args[2:])
	case "progress":
		err = cmdProgress(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "complement-report:", err)
		os.Exit(2)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: complement-report summarize|summary|table ... (see the source's doc comment)")
	os.Exit(2)
}

var locRe = regexp.MustCompile(`^\s+[\w./-]+\.go:\d+: (.*)$`)

func cmdSummarize(args []string) error {
	fs := flag.NewFlagSet("summarize", flag.ExitOnError)
	in := fs.String("in", "", "test2json output (several files: comma-separated)")
	out := fs.String("out", "", "result file to write")
	variant := fs.String("variant", "", "stock or patched")
	db := fs.String("db", "sqlite", "sqlite or postgres")
	cver := fs.String("complement", "", "Complement module version")
	sver := fs.String("synapse", "", "Synapse version")
	dur := fs.Float64("duration", 0, "wall-clock seconds of the run")
	sel := fs.String("selection", "", "what was run (for the record)")
	retry := fs.String("retry", "", "test2json output of the failed tests run again (comma-separated)")
	_ = fs.Parse(args)
	if *in == "" || *out == "" {
		return fmt.Errorf("summarize needs -in and -out")
	}
	run := Run{Variant: *variant, Database: *db, ComplementVersion: *cver, SynapseVersion: *sver, DurationS: *dur, Selection: *sel}
	for _, path := range strings.Split(*in, ",") {
		if err := collect(path, &run); err != nil {
			return err
		}
	}
	if *retry != "" {
		again := Run{}
		for _, path := range strings.Split(*retry, ",") {
			if err := collect(path, &again); err != nil {
				return err
			}
		}
		applyRetry(&run, &again)
	}
	sort.SliceStable(run.Tests, func(i, j int) bool {
		if run.Tests[i].Package != run.Tests[j].Package {
			return run.Tests[i].Package < run.Tests[j].Package
		}
		return false // keep run order within a package
	})
	for _, r := range run.Tests {
		switch r.Result {
		case "pass":
			run.Passed++
			if r.Retried {
				run.PassedOnRetry++
			}
		case "fail":
			run.Failed++
		case "skip":
			run.Skipped++
		}
	}
	raw, err := json.MarshalIndent(run, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(*out, append(raw, '\n'), 0o644)
}

// collect reads one test2json stream into run.
func collect(path string, run *Run) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	type state struct {
		pkg, name string
		output    []string
		result    string
		elapsed   float64
		order     int
	}
	tests := map[string]*state{}
	hasChild := map[string]bool{}
	order := 0
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if len(line) == 0 || line[0] != '{' {
			continue
		}
		var ev event
		if json.Unmarshal(line, &ev) != nil || ev.Test == "" {
			if run.Started == "" && !ev.Time.IsZero() {
				run.Started = ev.Time.UTC().Format(time.RFC3339)
			}
			continue
		}
		if run.Started == "" && !ev.Time.IsZero() {
			run.Started = ev.Time.UTC().Format(time.RFC3339)
		}
		key := ev.Package + "\x00" + ev.Test
		st := tests[key]
		if st == nil {
			order++
			st = &state{pkg: ev.Package, name: ev.Test, order: order}
			tests[key] = st
			if i := strings.LastIndex(ev.Test, "/"); i >= 0 {
				hasChild[ev.Package+"\x00"+ev.Test[:i]] = true
			}
			// Mark every ancestor too (a grandchild may appear first).
			for p := ev.Test; strings.Contains(p, "/"); {
				p = p[:strings.LastIndex(p, "/")]
				hasChild[ev.Package+"\x00"+p] = true
			}
		}
		switch ev.Action {
		case "output":
			if len(st.output) < 4000 {
				st.output = append(st.output, strings.TrimRight(ev.Output, "\n"))
			}
		case "pass", "fail", "skip":
			st.result, st.elapsed = ev.Action, ev.Elapsed
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	var states []*state
	for k, st := range tests {
		if hasChild[k] {
			continue
		}
		states = append(states, st)
	}
	sort.Slice(states, func(i, j int) bool { return states[i].order < states[j].order })
	for _, st := range states {
		if st.result == "" {
			run.Incomplete = append(run.Incomplete, st.pkg+" "+st.name)
			run.Tests = append(run.Tests, Result{Package: st.pkg, Test: st.name, Result: "fail", Reason: "did not finish (timeout or crash)"})
			continue
		}
		r := Result{Package: st.pkg, Test: st.name, Result: st.result, Elapsed: st.elapsed}
		switch st.result {
		case "skip":
			r.Reason = skipReason(st.output)
		case "fail":
			r.Reason = failReason(st.output)
		}
		run.Tests = append(run.Tests, r)
	}
	return nil
}

// skipReason is the message of the last "file.go:N: msg" line before
// "--- SKIP".
func skipReason(out []string) string {
	reason := ""
	for _, l := range out {
		if strings.Contains(l, "--- SKIP") {
			break
		}
		if m := locRe.FindStringSubmatch(l); m != nil {
			reason = m[1]
		}
	}
	return strings.TrimSpace(reason)
}

// failReason collects the test's error lines (those printed in red by
// Complement, or following "Error Trace"/t.Errorf locations), at most 3.
func failReason(out []string) string {
	var lines []string
	for _, l := range out {
		if strings.Contains(l, "\x1b[31m") || strings.Contains(l, "Error:") || strings.Contains(l, "FAIL:") && !strings.Contains(l, "--- FAIL") {
			l = strings.NewReplacer("\x1b[31m", "", "\x1b[39m", "").Replace(l)
			if m := locRe.FindStringSubmatch(l); m != nil {
				l = m[1]
			}
			lines = append(lines, strings.TrimSpace(l))
			if len(lines) == 3 {
				break
			}
		}
	}
	if len(lines) == 0 {
		// Fall back to the last location line before "--- FAIL".
		for _, l := range out {
			if strings.Contains(l, "--- FAIL") {
				break
			}
			if m := locRe.FindStringSubmatch(l); m != nil {
				lines = []string{strings.TrimSpace(m[1])}
			}
		}
	}
	s := strings.Join(lines, " / ")
	if len(s) > 400 {
		s = s[:400] + "…"
	}
	return s
}

func readRun(path string) (*Run, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var r Run
	if err := json.Unmarshal(raw, &r); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &r, nil
}

// applyRetry marks the tests of run that failed and passed in again (the
// same tests run once more) as passed on a retry. A test that failed again,
// or did not run again, keeps its failure.
func applyRetry(run, again *Run) {
	passed := map[string]bool{}
	for _, r := range again.Tests {
		if r.Result == "pass" {
			passed[r.Package+"\x00"+r.Test] = true
		}
	}
	for i := range run.Tests {
		r := &run.Tests[i]
		if r.Result == "fail" && passed[r.Package+"\x00"+r.Test] {
			r.Result = "pass"
			r.Retried = true
		}
	}
}

// cmdFailed prints the failed leaf tests of a result file, "package test" a line.
func cmdFailed(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("failed needs one result file")
	}
	r, err := readRun(args[0])
	if err != nil {
		return err
	}
	for _, t := range r.Tests {
		if t.Result == "fail" {
			fmt.Printf("%s %s\n", t.Package, t.Test)
		}
	}
	return nil
}

func cmdSummary(args []string) error {
	if len(args) != 1 {
		return fmt.Errorf("summary needs one result file")
	}
	r, err := readRun(args[0])
	if err != nil {
		return err
	}
	fmt.Printf("Complement %s on %s Synapse %s (%s), %s, %.0fs\n", r.ComplementVersion, r.Variant, r.SynapseVersion, r.Database, r.Selection, r.DurationS)
	for _, t := range r.Tests {
		if t.Result == "fail" {
			fmt.Printf("  FAIL %s %s: %s\n", t.Package, t.Test, t.Reason)
		} else if t.Retried {
			fmt.Printf("  PASSED ON A RETRY %s %s, after: %s\n", t.Package, t.Test, t.Reason)
		}
	}
	retried := ""
	if r.PassedOnRetry > 0 {
		retried = fmt.Sprintf(" (%d of them on a retry)", r.PassedOnRetry)
	}
	fmt.Printf("complement: %d passed, %d failed, %d skipped%s\n", r.Passed, r.Failed, r.Skipped, retried)
	if r.Failed > 0 || r.Passed == 0 {
		os.Exit(1)
	}
	return nil
}

const (
	beginMarker = "<!-- complement-results:begin (generated by scripts/complement --report; do not edit) -->"
	endMarker   = "<!-- complement-results:end -->"
)

func cmdTable(args []string) error {
	fs := flag.NewFlagSet("table", flag.ExitOnError)
	doc := fs.String("doc", "", "markdown file whose marked section is replaced (stdout if empty)")
	_ = fs.Parse(args)
	var runs []*Run
	for _, p := range fs.Args() {
		r, err := readRun(p)
		if err != nil {
			return err
		}
		runs = append(runs, r)
	}
	if len(runs) == 0 {
		return fmt.Errorf("table needs result files")
	}
	var b strings.Builder
	writeTable(&b, runs)
	if *doc == "" {
		_, err := io.WriteString(os.Stdout, b.String())
		return err
	}
	raw, err := os.ReadFile(*doc)
	if err != nil {
		return err
	}
	text := string(raw)
	i, j := strings.Index(text, beginMarker), strings.Index(text, endMarker)
	if i < 0 || j < i {
		return fmt.Errorf("%s has no %q ... %q section", *doc, beginMarker, endMarker)
	}
	text = text[:i+len(beginMarker)] + "\n" + b.String() + text[j:]
	return os.WriteFile(*doc, []byte(text), 0o644)
}

func label(r *Run) string { return r.Variant + " (" + r.Database + ")" }

func writeTable(b *strings.Builder, runs []*Run) {
	fmt.Fprintf(b, "\n| run | Complement | Synapse | selection | started (UTC) | wall time | passed | failed | skipped |\n")
	fmt.Fprintf(b, "| --- | --- | --- | --- | --- | --- | ---: | ---: | ---: |\n")
	for _, r := range runs {
		fmt.Fprintf(b, "| %s | `%s` | %s | %s | %s | %s | %d | %d | %d |\n", label(r), r.ComplementVersion, r.SynapseVersion,
			r.Selection, r.Started, fmtDur(r.DurationS), r.Passed, r.Failed, r.Skipped)
	}
	// One row per leaf test, in the order of the first run that has it.
	type row struct{ pkg, name string }
	var rows []row
	seen := map[row]bool{}
	for _, r := range runs {
		for _, t := range r.Tests {
			k := row{t.Package, t.Test}
			if !seen[k] {
				seen[k] = true
				rows = append(rows, k)
			}
		}
	}
	index := make([]map[row]Result, len(runs))
	for i, r := range runs {
		index[i] = map[row]Result{}
		for _, t := range r.Tests {
			index[i][row{t.Package, t.Test}] = t
		}
	}
	fmt.Fprintf(b, "\n| # | test |")
	for _, r := range runs {
		fmt.Fprintf(b, " %s |", label(r))
	}
	fmt.Fprintf(b, " notes |\n| ---: | --- |")
	for range runs {
		fmt.Fprintf(b, " --- |")
	}
	fmt.Fprintf(b, " --- |\n")
	for n, k := range rows {
		fmt.Fprintf(b, "| %d | `%s` |", n+1, k.name)
		var notes []string
		for i := range runs {
			t, ok := index[i][k]
			if !ok {
				fmt.Fprintf(b, " — |")
				continue
			}
			cell := t.Result
			if t.Result == "fail" {
				cell = "**FAIL**"
			}
			if t.Result != "skip" {
				cell += fmt.Sprintf(" (%.1fs)", t.Elapsed)
			}
			fmt.Fprintf(b, " %s |", cell)
			if t.Reason != "" {
				note := t.Reason
				if t.Result == "fail" {
					note = label(runs[i]) + ": " + note
				}
				if !contains(notes, note) {
					notes = append(notes, note)
				}
			}
		}
		fmt.Fprintf(b, " %s |\n", escape(strings.Join(notes, "; ")))
	}
	b.WriteString("\n")
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func escape(s string) string {
	return strings.NewReplacer("|", "\\|", "\n", " ").Replace(s)
}

func fmtDur(s float64) string {
	d := time.Duration(s * float64(time.Second)).Round(time.Second)
	return d.String()
}

// cmdProgress follows a test2json file while the process writing it runs and
// prints one line per finished test (and the package's verdict).
func cmdProgress(args []string) error {
	fs := flag.NewFlagSet("progress", flag.ExitOnError)
	path := fs.String("follow", "", "test2json file being written")
	pid := fs.Int("pid", 0, "process writing it; stop when it has exited")
	_ = fs.Parse(args)
	alive := func() bool {
		if *pid <= 0 {
			return false
		}
		_, err := os.Stat(fmt.Sprintf("/proc/%d", *pid))
		return err == nil
	}
	var f *os.File
	for f == nil {
		var err error
		if f, err = os.Open(*path); err != nil {
			if !alive() {
				return err
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	defer f.Close()
	rd := bufio.NewReader(f)
	var partial []byte
	counts := map[string]int{}
	for {
		chunk, err := rd.ReadBytes('\n')
		partial = append(partial, chunk...)
		if err == io.EOF {
			if !alive() {
				// Drain what is left, then stop.
				rest, _ := io.ReadAll(rd)
				partial = append(partial, rest...)
				for _, l := range strings.Split(string(partial), "\n") {
					printProgress([]byte(l), counts)
				}
				break
			}
			time.Sleep(200 * time.Millisecond)
			continue
		} else if err != nil {
			return err
		}
		printProgress(partial, counts)
		partial = partial[:0]
	}
	fmt.Printf("    (%d passed, %d failed, %d skipped, counting parents)\n", counts["pass"], counts["fail"], counts["skip"])
	return nil
}

func printProgress(line []byte, counts map[string]int) {
	if len(line) == 0 || line[0] != '{' {
		return
	}
	var ev event
	if json.Unmarshal(line, &ev) != nil {
		return
	}
	switch ev.Action {
	case "pass", "fail", "skip":
	default:
		return
	}
	if ev.Test == "" {
		fmt.Printf("  %s %s (%.0fs)\n", strings.ToUpper(ev.Action), ev.Package, ev.Elapsed)
		return
	}
	counts[ev.Action]++
	fmt.Printf("  %-4s %6.1fs %s\n", strings.ToUpper(ev.Action), ev.Elapsed, ev.Test)
}
