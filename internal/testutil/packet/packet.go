// Package packet builds the raw packets that network tests send by hand.
// It is a leaf package, so that a static probe binary run inside a sandbox
// can use it without the rest of testutil.
package packet

import "encoding/binary"

// Checksum is the Internet checksum (RFC 1071) of b, as IPv4 headers,
// ICMP and UDP carry it.
func Checksum(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return ^uint16(sum)
}

// ICMPEcho is an ICMPv4 echo request with its checksum set.
func ICMPEcho(id, seq uint16, payload []byte) []byte {
	msg := []byte{8, 0, 0, 0}
	msg = binary.BigEndian.AppendUint16(msg, id)
	msg = binary.BigEndian.AppendUint16(msg, seq)
	msg = append(msg, payload...)
	binary.BigEndian.PutUint16(msg[2:], Checksum(msg))
	return msg
}
