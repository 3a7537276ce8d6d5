package netpolicy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/atomicfile"
)

// lease is what is kept on disk for one sandbox: its address block and its
// allowlist, so that a restarted plugin can serve Allow and Reconcile.
type lease struct {
	ID      string       `json:"id"`
	Hash    string       `json:"hash"`
	Addr    netip.Prefix `json:"addr"`
	Gateway netip.Addr   `json:"gateway"`
	MAC     string       `json:"mac,omitempty"`
	Allow   []string     `json:"allow"`
	Created time.Time    `json:"created"`
	// Attached is set for a sandbox in a namespace made by someone else.
	Attached *attachment `json:"attached,omitempty"`
}

func (c *Config) leaseDir() string { return filepath.Join(c.StateDir, "leases") }

func (c *Config) leasePath(hash string) string {
	return filepath.Join(c.leaseDir(), hash+".json")
}

// lockState takes the state directory's lock, which serializes the
// managers of every process on the node; the returned function releases it.
func (c *Config) lockState() (func(), error) {
	if err := os.MkdirAll(c.leaseDir(), 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(c.StateDir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state lock: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("state lock: %w", err)
	}
	return func() { f.Close() }, nil
}

func (c *Config) readLease(hash string) (*lease, error) {
	var l lease
	if err := atomicfile.ReadJSON(c.leasePath(hash), &l); err != nil {
		return nil, fmt.Errorf("lease %s: %w", hash, err)
	}
	return &l, nil
}

// readLeases returns every lease by hash. A lease file that cannot be read
// still holds its hash (so that its block stays taken and Reconcile removes
// it), with a zero address.
func (c *Config) readLeases() (map[string]*lease, error) {
	ents, err := os.ReadDir(c.leaseDir())
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]*lease{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read leases: %w", err)
	}
	out := map[string]*lease{}
	for _, e := range ents {
		h, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || len(h) != hashLen {
			continue
		}
		l, err := c.readLease(h)
		if err != nil {
			l = &lease{Hash: h}
		}
		out[h] = l
	}
	return out, nil
}

func (c *Config) writeLease(l *lease) error {
	if err := atomicfile.WriteJSON(c.leasePath(l.Hash), l, 0o600); err != nil {
		return fmt.Errorf("write lease: %w", err)
	}
	return nil
}

func (c *Config) removeLease(hash string) error {
	err := os.Remove(c.leasePath(hash))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove lease: %w", err)
	}
	return nil
}

// allocate picks a free /30 block of Subnet for hash, probing from a
// position derived from the hash so that addresses spread over the pool and
// a freed block is not handed out again at once.
func (c *Config) allocate(hash string, taken map[string]*lease) (addr netip.Prefix, gw netip.Addr, err error) {
	used := map[netip.Prefix]bool{}
	for _, l := range taken {
		if l.Addr.IsValid() {
			used[l.Addr.Masked()] = true
		}
	}
	blocks := uint32(1) << (30 - c.Subnet.Bits())
	var seed [8]byte
	copy(seed[:], hash)
	start := uint32(binary.BigEndian.Uint64(seed[:]) % uint64(blocks))
	base := binary.BigEndian.Uint32(c.Subnet.Addr().AsSlice())
	for i := uint32(0); i < blocks; i++ {
		n := base + ((start+i)%blocks)*4
		block := netip.PrefixFrom(u32Addr(n), 30)
		if used[block] {
			continue
		}
		return netip.PrefixFrom(u32Addr(n+2), 30), u32Addr(n + 1), nil
	}
	return netip.Prefix{}, netip.Addr{}, fmt.Errorf("network subnet %s: all %d /30 blocks are in use", c.Subnet, blocks)
}

func u32Addr(n uint32) netip.Addr {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], n)
	return netip.AddrFrom4(b)
}

func addrU32(a netip.Addr) uint32 {
	b := a.As4()
	return binary.BigEndian.Uint32(b[:])
}
