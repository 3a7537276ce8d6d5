package main

import (
	"bytes"
	"testing"

	"github.com/hashicorp/nomad/api"
	"github.com/shoenig/test/must"
)

func frame(file, data string) *api.StreamFrame {
	return &api.StreamFrame{File: "alloc/logs/" + file, Data: []byte(data)}
}

// A read from the start after a partial one writes only the missing part,
// across rotated files, whatever the frames' boundaries.
func TestLogStreamResume(t *testing.T) {
	var out bytes.Buffer
	s := newLogStream(nil, nil, "main", "stdout", &out)

	// The live stream brings part of the first file, then breaks.
	s.seenFile, s.seen = "", 0
	s.consume(frame("main.stdout.0", "abc"))
	s.consume(frame("main.stdout.0", "de"))
	must.Eq(t, "abcde", out.String())

	// A new read from the start, in other frame sizes, with more data
	// and a rotation.
	s.seenFile, s.seen = "", 0
	for _, f := range []*api.StreamFrame{
		frame("main.stdout.0", "ab"),
		frame("main.stdout.0", "cdefg"),
		frame("main.stdout.0", "h"),
		{FileEvent: "file deleted"},
		frame("main.stdout.1", "ij"),
	} {
		s.consume(f)
	}
	must.Eq(t, "abcdefghij", out.String())

	// Once more, nothing new: nothing is written.
	s.seenFile, s.seen = "", 0
	n := s.consume(frame("main.stdout.0", "abcdefgh")) + s.consume(frame("main.stdout.1", "ij"))
	must.Eq(t, 0, n)
	must.Eq(t, "abcdefghij", out.String())

	// The first file was rotated away before the next read.
	s.seenFile, s.seen = "", 0
	s.consume(frame("main.stdout.1", "ijk"))
	s.consume(frame("main.stdout.2", "l"))
	must.Eq(t, "abcdefghijkl", out.String())
}

func TestLogIndex(t *testing.T) {
	must.Eq(t, 0, logIndex("alloc/logs/main.stdout.0"))
	must.Eq(t, 12, logIndex("alloc/logs/my.task.stderr.12"))
	must.Eq(t, -1, logIndex("alloc/logs/.main.stdout.fifo"))
}
