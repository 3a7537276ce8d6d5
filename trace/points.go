// Package trace is a task's trail: what ran inside its sandbox, as gVisor's
// own kernel saw it (Runtime Monitoring). It writes the pod-init-config that
// asks runsc for a trace session whose points go to the "remote" sink, and
// receives those points on a Unix SEQPACKET socket, turning them into JSON
// lines. The receiver runs in the task's supervisor, so the trail outlives
// plugin restarts.
package trace

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
)

// Trail points, as the operator names them in trace_points.
const (
	PointExec      = "exec"
	PointConnect   = "connect"
	PointExit      = "exit"
	PointOpenWrite = "open_write"
	PointBind      = "bind"
)

// DefaultPoints is trace_points when the operator does not set it.
func DefaultPoints() []string { return []string{PointExec, PointConnect, PointExit} }

func knownPoints() []string {
	return []string{PointExec, PointConnect, PointExit, PointOpenWrite, PointBind}
}

// ValidatePoints checks a trace_points list: known names, no repeats, not
// empty.
func ValidatePoints(points []string) error {
	if len(points) == 0 {
		return fmt.Errorf("trace_points is empty: list at least one of %s, or unset trace_log to turn the trail off", strings.Join(knownPoints(), ", "))
	}
	seen := map[string]bool{}
	for _, p := range points {
		if !slices.Contains(knownPoints(), p) {
			return fmt.Errorf("trace_points: unknown point %q: use %s", p, strings.Join(knownPoints(), ", "))
		}
		if seen[p] {
			return fmt.Errorf("trace_points: %q is listed twice", p)
		}
		seen[p] = true
	}
	return nil
}

// Context fields asked of every point: who did it, where, and when.
func contextFields() []string {
	return []string{"time", "thread_id", "group_id", "credentials", "cwd", "process_name", "parent_thread_group_id"}
}

type pointConfig struct {
	Name           string   `json:"name"`
	OptionalFields []string `json:"optional_fields,omitempty"`
	ContextFields  []string `json:"context_fields,omitempty"`
}

type sinkConfig struct {
	Name   string         `json:"name"`
	Config map[string]any `json:"config"`
}

type sessionConfig struct {
	Name   string        `json:"name"`
	Points []pointConfig `json:"points"`
	Sinks  []sinkConfig  `json:"sinks"`
}

// gvisorPoints maps a trail point to the gVisor points it needs.
func gvisorPoints(p string) []pointConfig {
	ctx := contextFields()
	switch p {
	case PointExec:
		return []pointConfig{{Name: "sentry/execve", OptionalFields: []string{"binary_sha256"}, ContextFields: ctx}}
	case PointConnect:
		// The enter point is there so that a connect that never returns
		// (dropped by the egress filter until the task ends) is still on
		// record; socket/exit gives the protocol of the descriptor.
		return []pointConfig{
			{Name: "syscall/connect/enter", ContextFields: ctx},
			{Name: "syscall/connect/exit", ContextFields: ctx},
			socketPoint(),
		}
	case PointExit:
		return []pointConfig{{Name: "sentry/task_exit", ContextFields: ctx}}
	case PointOpenWrite:
		// gVisor has no point for "opened for writing": every open comes
		// and the receiver keeps those with a write flag.
		return []pointConfig{
			{Name: "syscall/open/exit", ContextFields: ctx},
			{Name: "syscall/openat/exit", OptionalFields: []string{"fd_path"}, ContextFields: ctx},
			{Name: "syscall/creat/exit", ContextFields: ctx},
		}
	case PointBind:
		return []pointConfig{{Name: "syscall/bind/exit", ContextFields: ctx}, socketPoint()}
	}
	return nil
}

// socketPoint tells the receiver each socket's protocol, for connect and
// bind; it writes no line of its own.
func socketPoint() pointConfig {
	return pointConfig{Name: "syscall/socket/exit", ContextFields: []string{"group_id"}}
}

// PodInitConfig is the content of runsc's --pod-init-config file: one trace
// session ("Default", the only one runsc supports) sending points to the
// remote sink at endpoint. runsc does not retry a full socket: a receiver
// that falls behind costs dropped points (counted in each message's header),
// never a stalled sandbox.
func PodInitConfig(endpoint string, points []string) ([]byte, error) {
	if err := ValidatePoints(points); err != nil {
		return nil, err
	}
	s := sessionConfig{Name: "Default", Sinks: []sinkConfig{{Name: "remote", Config: map[string]any{"endpoint": endpoint}}}}
	for _, p := range points {
		for _, gp := range gvisorPoints(p) {
			// connect and bind share the socket point; a session
			// names each point once.
			if !slices.ContainsFunc(s.Points, func(q pointConfig) bool { return q.Name == gp.Name }) {
				s.Points = append(s.Points, gp)
			}
		}
	}
	return json.Marshal(struct {
		TraceSession sessionConfig `json:"trace_session"`
	}{s})
}
