package driver

import (
	"context"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shoenig/test/wait"
)

// taskEvents records a driver's task events by task ID, from one
// subscription that ends with the test or benchmark.
type taskEvents struct {
	mu   sync.Mutex
	msgs map[string][]string
}

// watchEvents subscribes to d's task events until tb ends.
func watchEvents(tb testing.TB, d *Driver) *taskEvents {
	tb.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	tb.Cleanup(cancel)
	ch, err := d.TaskEvents(ctx)
	if err != nil {
		tb.Fatalf("TaskEvents: %v", err)
	}
	ev := &taskEvents{msgs: map[string][]string{}}
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case te, ok := <-ch:
				if !ok {
					return
				}
				ev.mu.Lock()
				ev.msgs[te.TaskID] = append(ev.msgs[te.TaskID], te.Message)
				ev.mu.Unlock()
			}
		}
	}()
	return ev
}

// messages is every event of taskID so far, oldest first.
func (ev *taskEvents) messages(taskID string) []string {
	ev.mu.Lock()
	defer ev.mu.Unlock()
	return slices.Clone(ev.msgs[taskID])
}

// find returns the first event of taskID containing s.
func (ev *taskEvents) find(taskID, s string) (string, bool) {
	for _, m := range ev.messages(taskID) {
		if strings.Contains(m, s) {
			return m, true
		}
	}
	return "", false
}

// wait is find, waiting up to timeout for the event to arrive.
func (ev *taskEvents) wait(taskID, s string, timeout time.Duration) (string, bool) {
	var found string
	err := wait.InitialSuccess(wait.BoolFunc(func() bool {
		m, ok := ev.find(taskID, s)
		found = m
		return ok
	}), wait.Timeout(timeout), wait.Gap(5*time.Millisecond)).Run()
	return found, err == nil
}

// events is one task's events, for a test that fails when one does not
// come.
type events struct {
	all    *taskEvents
	taskID string
}

// events subscribes to the driver's task events and keeps taskID's.
func (e *testEnv) events(t *testing.T, taskID string) *events {
	t.Helper()
	return &events{all: watchEvents(t, e.driver), taskID: taskID}
}

// waitFor waits for an event containing s and returns its message.
func (ev *events) waitFor(t *testing.T, s string) string {
	t.Helper()
	return ev.waitWithin(t, s, 10*time.Second)
}

// waitWithin waits up to d for an event containing s.
func (ev *events) waitWithin(t *testing.T, s string, d time.Duration) string {
	t.Helper()
	m, ok := ev.all.wait(ev.taskID, s, d)
	if !ok {
		t.Fatalf("no event containing %q within %s; events: %q", s, d, ev.all.messages(ev.taskID))
	}
	return m
}
