package trace

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
)

// Message types of the remote sink's header (gVisor's pb.MessageType).
const (
	msgExec     = 3
	msgTaskExit = 5
	msgOpen     = 7
	msgConnect  = 10
	msgSocket   = 12
	msgBind     = 24
)

// headerSize is the smallest header of the remote sink's wire format: a
// little-endian uint16 header size, uint16 message type and uint32 count of
// points the sandbox dropped so far (wrapping); the protobuf message follows
// at header size, which may grow in later versions.
const headerSize = 8

// header is one message's header.
type header struct {
	size    uint16
	msgType uint16
	dropped uint32
}

func parseHeader(b []byte) (header, []byte, error) {
	if len(b) < headerSize {
		return header{}, nil, fmt.Errorf("message of %d bytes is shorter than its header", len(b))
	}
	h := header{
		size:    binary.LittleEndian.Uint16(b[0:]),
		msgType: binary.LittleEndian.Uint16(b[2:]),
		dropped: binary.LittleEndian.Uint32(b[4:]),
	}
	if int(h.size) < headerSize || int(h.size) > len(b) {
		return header{}, nil, fmt.Errorf("header size %d out of range (message of %d bytes)", h.size, len(b))
	}
	return h, b[h.size:], nil
}

// procContext is the point's ContextData: who did it.
type procContext struct {
	timeNs  int64
	tid     int32
	pid     int32 // thread group id
	ppid    int32
	uid     uint32
	gid     uint32
	cwd     string
	process string
}

// event is one decoded point; which fields are set depends on msgType.
type event struct {
	msgType uint16
	ctx     procContext
	// sentry/execve
	path   string
	argv   []string
	argc   int // arguments there were, kept or not
	sha256 []byte
	// sentry/task_exit: a Linux wait status.
	status int32
	// syscall points
	hasExit  bool
	result   int64
	errno    int64
	fd       int64
	fdPath   string
	address  []byte
	pathname string
	flags    uint32
	// syscall/socket
	domain, sockType, protocol int32
}

// fields calls fn for each field of a protobuf message: its number, the
// varint value (varint fields) or the bytes (length-delimited fields). Other
// wire types are skipped.
func fields(b []byte, fn func(num protowire.Number, v uint64, data []byte)) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return protowire.ParseError(n)
		}
		b = b[n:]
		switch typ {
		case protowire.VarintType:
			v, m := protowire.ConsumeVarint(b)
			if m < 0 {
				return protowire.ParseError(m)
			}
			fn(num, v, nil)
			b = b[m:]
		case protowire.BytesType:
			v, m := protowire.ConsumeBytes(b)
			if m < 0 {
				return protowire.ParseError(m)
			}
			fn(num, 0, v)
			b = b[m:]
		default:
			m := protowire.ConsumeFieldValue(num, typ, b)
			if m < 0 {
				return protowire.ParseError(m)
			}
			b = b[m:]
		}
	}
	return nil
}

func decodeContext(b []byte) (procContext, error) {
	var c procContext
	var credErr error
	err := fields(b, func(num protowire.Number, v uint64, data []byte) {
		switch num {
		case 1:
			c.timeNs = int64(v)
		case 2:
			c.tid = int32(v)
		case 4:
			c.pid = int32(v)
		case 8:
			c.cwd = capString(data, maxPath)
		case 9:
			c.process = capString(data, maxProcess)
		case 10:
			c.ppid = int32(v)
		case 7: // Credentials: the effective ids are the ones checked.
			credErr = fields(data, func(num protowire.Number, v uint64, _ []byte) {
				switch num {
				case 2:
					c.uid = uint32(v)
				case 5:
					c.gid = uint32(v)
				}
			})
		}
	})
	return c, errors.Join(err, credErr)
}

// maxArgs caps what is kept of an argv: the first maxArgs arguments, each
// cut to maxArgLen bytes. A record stays small whatever the task passes,
// and whatever a Sentry the task escaped into sends: every string from the
// sandbox is cut (paths, the working directory, the process name), so that
// a line stays within maxLine and a connect kept until its exit stays small.
const (
	maxArgs    = 32
	maxArgLen  = 256
	maxPath    = 1024
	maxProcess = 64 // Linux and gVisor name a process in 15 bytes
	// maxSockaddr is the largest address connect and bind take
	// (sizeof(struct sockaddr_storage)).
	maxSockaddr = 128
)

// capString is b as a string cut to n bytes as JSON writes it: a control
// character, an invalid UTF-8 byte, <, >, &, U+2028 and U+2029 take six
// (\u001b, \ufffd, \u003c, ...), a quote or backslash two; a cut string ends
// in "…".
func capString(b []byte, n int) string {
	size := 0
	for i := 0; i < len(b); {
		r, w := utf8.DecodeRune(b[i:])
		switch {
		case r == utf8.RuneError && w == 1, r < 0x20, r == '<', r == '>', r == '&', r == '\u2028', r == '\u2029':
			size += 6
		case r == '"', r == '\\':
			size += 2
		default:
			size += w
		}
		if size > n {
			return string(b[:i]) + "…"
		}
		i += w
	}
	return string(b)
}

// decode turns one message into an event. Unknown message types decode to
// an event with only msgType set.
func decode(msgType uint16, b []byte) (*event, error) {
	ev := &event{msgType: msgType}
	var ctxErr, exitErr error
	err := fields(b, func(num protowire.Number, v uint64, data []byte) {
		if num == 1 {
			ev.ctx, ctxErr = decodeContext(data)
			return
		}
		switch msgType {
		case msgExec:
			switch num {
			case 2:
				ev.path = capString(data, maxPath)
			case 3:
				ev.argc++
				if len(ev.argv) < maxArgs {
					ev.argv = append(ev.argv, capString(data, maxArgLen))
				}
			case 8:
				// A digest of another size is not a SHA-256.
				if len(data) == sha256.Size {
					ev.sha256 = append([]byte(nil), data...)
				}
			}
		case msgTaskExit:
			if num == 2 {
				ev.status = int32(v)
			}
		case msgOpen, msgConnect, msgBind, msgSocket:
			switch {
			case num == 2:
				ev.hasExit = true
				exitErr = fields(data, func(num protowire.Number, v uint64, _ []byte) {
					switch num {
					case 1:
						ev.result = int64(v)
					case 2:
						ev.errno = int64(v)
					}
				})
			case num == 4 && msgType == msgSocket:
				ev.domain = int32(v)
			case num == 5 && msgType == msgSocket:
				ev.sockType = int32(v)
			case num == 6 && msgType == msgSocket:
				ev.protocol = int32(v)
			case num == 4:
				ev.fd = int64(v)
			case num == 5:
				ev.fdPath = capString(data, maxPath)
			case num == 6 && msgType == msgOpen:
				ev.pathname = capString(data, maxPath)
			case num == 6:
				ev.address = append([]byte(nil), data[:min(len(data), maxSockaddr)]...)
			case num == 7 && msgType == msgOpen:
				ev.flags = uint32(v)
			}
		}
	})
	if err = errors.Join(err, ctxErr, exitErr); err != nil {
		return nil, fmt.Errorf("decode message type %d: %w", msgType, err)
	}
	return ev, nil
}
