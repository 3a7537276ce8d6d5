package atomicfile

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestWriteJSON(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state.json")
	if err := os.WriteFile(path, []byte(`{"n":1}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteJSON(path, map[string]int{"n": 2}, 0o600); err != nil {
		t.Fatal(err)
	}
	var got map[string]int
	b, _ := os.ReadFile(path)
	if err := json.Unmarshal(b, &got); err != nil || got["n"] != 2 {
		t.Fatalf("after WriteJSON: %s (%v)", b, err)
	}
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("mode: %v %v", st, err)
	}
	// A value that cannot be encoded leaves the old file and no temporary.
	if err := WriteJSON(path, make(chan int), 0o600); err == nil {
		t.Fatal("a channel was encoded")
	}
	// A directory that cannot take the temporary file fails cleanly.
	if err := WriteJSON(filepath.Join(dir, "missing", "x.json"), 1, 0o600); err == nil {
		t.Fatal("write into a missing directory succeeded")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("files left: %v", entries)
	}
	b, _ = os.ReadFile(path)
	if string(b) != "{\n  \"n\": 2\n}" {
		t.Errorf("the old file changed: %s", b)
	}
}

// ReadJSON reads what WriteJSON wrote; a missing file is ErrNotExist and a
// broken one an error naming the file.
func TestReadJSON(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state.json")
	if err := WriteJSON(path, map[string]int{"n": 3}, 0o600); err != nil {
		t.Fatal(err)
	}
	var got map[string]int
	if err := ReadJSON(path, &got); err != nil || got["n"] != 3 {
		t.Fatalf("ReadJSON: %v %v", got, err)
	}
	missing := filepath.Join(dir, "missing.json")
	if err := ReadJSON(missing, &got); !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing file: %v", err)
	}
	if err := os.WriteFile(path, []byte(`{"n":`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := ReadJSON(path, &got); err == nil || !strings.Contains(err.Error(), path) {
		t.Errorf("torn file: %v", err)
	}
}
