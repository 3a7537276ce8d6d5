package runtime

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/shoenig/test/must"
)

// Every path a StateDir method gives is an entry that StateFiles lists, so
// the list (and the documentation checked against it) cannot miss a file.
func TestStateDir_MethodsListed(t *testing.T) {
	listed := map[string]bool{}
	for _, f := range StateFiles() {
		listed[f.Name] = true
	}
	sd := StateDir("/state/nomad-x")
	v := reflect.ValueOf(sd)
	given := map[string]bool{}
	for i := 0; i < v.NumMethod(); i++ {
		m := v.Type().Method(i)
		if m.Name == "Path" || m.Type.NumIn() != 1 || m.Type.NumOut() != 1 || m.Type.Out(0).Kind() != reflect.String {
			continue
		}
		p := v.Method(i).Call(nil)[0].String()
		name := p
		if filepath.IsAbs(p) {
			rel, err := filepath.Rel(sd.Path(), p)
			must.NoError(t, err)
			name = rel
		}
		// A directory is listed by the files in it (bundle/config.json).
		found := listed[name]
		for l := range listed {
			if strings.HasPrefix(l, name+"/") {
				found = true
			}
		}
		must.True(t, found, must.Sprintf("StateDir.%s gives %q, which StateFiles does not list", m.Name, name))
		given[name] = true
	}
	for l := range listed {
		must.True(t, given[l], must.Sprintf("StateFiles lists %q, which no StateDir method gives", l))
	}
}

// The names are on disk on running nodes: a plugin upgraded in place
// recovers the tasks an older one started only if none changes.
func TestStateDir_NamesUnchanged(t *testing.T) {
	var names []string
	for _, f := range StateFiles() {
		names = append(names, f.Name)
	}
	must.Eq(t, "task.json bundle/config.json resolv.conf hosts pins network.json disk.json disk allocdisk.json nosuid.json "+
		"supervisor.json supervisor.pid supervisor.sock supervisor.log sandbox.pid runsc.log runsc-panic.log "+
		"trace.sock trace.json exit.json exec-*.json", strings.Join(names, " "))
}

// docs/ARCHITECTURE.md's table of the state directory is StateFiles, so a
// newcomer reads every file there and what it is for.
func TestStateFiles_Documented(t *testing.T) {
	const begin, end = "<!-- state files: begin -->\n", "<!-- state files: end -->"
	b, err := os.ReadFile(filepath.Join("..", "docs", "ARCHITECTURE.md"))
	must.NoError(t, err)
	_, rest, ok := strings.Cut(string(b), begin)
	must.True(t, ok, must.Sprint("docs/ARCHITECTURE.md has no state files table"))
	table, _, ok := strings.Cut(rest, end)
	must.True(t, ok, must.Sprint("docs/ARCHITECTURE.md's state files table has no end"))

	var want strings.Builder
	want.WriteString("| File | Written by | Holds |\n| --- | --- | --- |\n")
	for _, f := range StateFiles() {
		fmt.Fprintf(&want, "| `%s` | %s | %s |\n", f.Name, f.Writer, f.Holds)
	}
	if os.Getenv("UPDATE_DOCS") != "" && table != want.String() {
		doc := strings.Replace(string(b), begin+table+end, begin+want.String()+end, 1)
		must.NoError(t, os.WriteFile(filepath.Join("..", "docs", "ARCHITECTURE.md"), []byte(doc), 0o644))
		return
	}
	must.Eq(t, want.String(), table, must.Sprintf("docs/ARCHITECTURE.md's state files table differs from StateFiles; the table should read (UPDATE_DOCS=1 go test -run TestStateFiles_Documented ./runtime/ writes it):\n%s", want.String()))
}
