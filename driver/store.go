package driver

import "sync"

// taskStore holds the handles of the tasks this plugin process runs. Each
// handle has its own lock; the store's lock only guards the map.
type taskStore struct {
	mu    sync.RWMutex
	tasks map[string]*taskHandle
}

func newTaskStore() *taskStore { return &taskStore{tasks: map[string]*taskHandle{}} }

func (s *taskStore) Set(id string, h *taskHandle) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tasks[id] = h
}

func (s *taskStore) Get(id string) (*taskHandle, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	h, ok := s.tasks[id]
	return h, ok
}

func (s *taskStore) Delete(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.tasks, id)
}

// Running is the number of tasks whose sandbox has not ended.
func (s *taskStore) Running() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	n := 0
	for _, h := range s.tasks {
		if h.running() {
			n++
		}
	}
	return n
}

// SandboxIDs is the set of sandbox IDs the store holds.
func (s *taskStore) SandboxIDs() map[string]bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	ids := make(map[string]bool, len(s.tasks))
	for _, h := range s.tasks {
		ids[h.sandboxID] = true
	}
	return ids
}
