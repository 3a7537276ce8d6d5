package runtime

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strconv"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/safeopen"
)

// ResolveUser turns a Nomad task `user` ("name", "uid", "name:group",
// "uid:gid") into the uid, gid and supplementary groups it has inside rootfs.
// The rootfs is untrusted: its files are read with links resolved inside
// it, so a symlink cannot make the driver read a host file, and only when
// they are regular files, so a FIFO or device cannot hang the start.
func ResolveUser(rootfs, user string) (specs.User, error) {
	if user == "" {
		return specs.User{UID: 0, GID: 0}, nil
	}

	name, group, hasGroup := strings.Cut(user, ":")
	if name == "" || (hasGroup && group == "") {
		return specs.User{}, fmt.Errorf("user %q: use \"name\", \"uid\", \"name:group\" or \"uid:gid\"", user)
	}
	passwd, err := readDB(rootfs, "etc/passwd")
	if err != nil {
		return specs.User{}, fmt.Errorf("user %q: %w", user, err)
	}
	groups, err := readDB(rootfs, "etc/group")
	if err != nil {
		return specs.User{}, fmt.Errorf("user %q: %w", user, err)
	}

	var u specs.User
	userName := ""
	if uid, err := parseID(name); err == nil {
		u.UID = uid
		// A numeric user without a group takes its primary group from
		// passwd when the image lists it, as runc does.
		for _, e := range passwd {
			if len(e) >= 4 && e[2] == name {
				userName = e[0]
				gid, err := parseID(e[3])
				if err == nil {
					u.GID = gid
				}
				break
			}
		}
		if userName == "" {
			u.GID = uid
		}
	} else {
		found := false
		for _, e := range passwd {
			if len(e) >= 4 && e[0] == name {
				uid, err1 := parseID(e[2])
				gid, err2 := parseID(e[3])
				if err1 != nil || err2 != nil {
					return specs.User{}, fmt.Errorf("user %q: malformed /etc/passwd entry in rootfs", user)
				}
				u.UID, u.GID, userName, found = uid, gid, name, true
				break
			}
		}
		if !found {
			return specs.User{}, fmt.Errorf("user %q: no such user in the rootfs /etc/passwd; use a numeric \"uid:gid\" or add the user to the image", user)
		}
	}

	if hasGroup {
		if gid, err := parseID(group); err == nil {
			u.GID = gid
		} else {
			found := false
			for _, e := range groups {
				if len(e) >= 3 && e[0] == group {
					gid, err := parseID(e[2])
					if err != nil {
						return specs.User{}, fmt.Errorf("user %q: malformed /etc/group entry in rootfs", user)
					}
					u.GID, found = gid, true
					break
				}
			}
			if !found {
				return specs.User{}, fmt.Errorf("user %q: no such group %q in the rootfs /etc/group", user, group)
			}
		}
	}

	if userName != "" {
		for _, e := range groups {
			if len(e) < 4 || e[3] == "" {
				continue
			}
			for _, member := range strings.Split(e[3], ",") {
				if member != userName {
					continue
				}
				if gid, err := parseID(e[2]); err == nil && gid != u.GID {
					u.AdditionalGids = append(u.AdditionalGids, gid)
				}
			}
		}
	}
	return u, nil
}

func parseID(s string) (uint32, error) {
	n, err := strconv.ParseUint(s, 10, 32)
	return uint32(n), err
}

// readDB reads a colon-separated database such as /etc/passwd. A missing file
// is an empty database.
func readDB(rootfs, name string) ([][]string, error) {
	f, err := safeopen.ReadRegular(rootfs, name, safeopen.InRoot)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read /%s in rootfs: %w", name, err)
	}
	defer f.Close()
	var out [][]string
	sc := bufio.NewScanner(io.LimitReader(f, 4<<20))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		out = append(out, strings.Split(line, ":"))
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read /%s in rootfs: %w", name, err)
	}
	return out, nil
}
