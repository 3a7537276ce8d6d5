// Command egress-probe is a task for the driver's egress tests. The
// busybox of the test rootfs has no UDP client (nc has no -u) and its ping
// needs a raw socket, which gVisor does not give a task. A task can still
// send UDP and ICMP echo (through an unprivileged ICMP socket, which gVisor
// supports): this is such a task, built static (driver/egress_test.go's
// installEgressProbe) and run as /local/egress-probe.
package main

import (
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/nomad-driver-sandbox/nomad-driver-sandbox/internal/testutil/packet"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Println("usage: egress-probe udp IP:PORT | ping IP | spoof SRC IP:PORT")
		os.Exit(2)
	}
	var err error
	switch {
	case os.Args[1] == "udp":
		err = udp(os.Args[2])
	case os.Args[1] == "ping":
		err = ping(os.Args[2])
	case os.Args[1] == "spoof" && len(os.Args) == 4:
		err = spoof(os.Args[2], os.Args[3])
	case os.Args[1] == "flood" && len(os.Args) == 5:
		err = flood(os.Args[2], os.Args[3], os.Args[4])
	default:
		err = fmt.Errorf("unknown probe %q", os.Args[1])
	}
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
}

func udp(dst string) error {
	c, err := net.Dial("udp4", dst)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("probe")); err != nil {
		return err
	}
	buf := make([]byte, 1500)
	n, err := c.Read(buf)
	if err != nil {
		return err
	}
	fmt.Printf("reply: %s\n", buf[:n])
	return nil
}

func ping(dst string) error {
	ip := net.ParseIP(dst).To4()
	if ip == nil {
		return fmt.Errorf("not an IPv4 address: %s", dst)
	}
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM, syscall.IPPROTO_ICMP)
	if err != nil {
		return fmt.Errorf("ICMP socket: %w", err)
	}
	defer syscall.Close(fd)
	tv := syscall.Timeval{Sec: 2}
	if err := syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_RCVTIMEO, &tv); err != nil {
		return err
	}
	msg := packet.ICMPEcho(1, 1, []byte("probe"))
	to := &syscall.SockaddrInet4{}
	copy(to.Addr[:], ip)
	if err := syscall.Sendto(fd, msg, 0, to); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	buf := make([]byte, 1500)
	for {
		n, from, err := syscall.Recvfrom(fd, buf, 0)
		if err != nil {
			return fmt.Errorf("no reply: %w", err)
		}
		if f, ok := from.(*syscall.SockaddrInet4); ok && n >= 8 && buf[0] == 0 && net.IP(f.Addr[:]).Equal(ip) {
			fmt.Printf("reply from %s\n", dst)
			return nil
		}
	}
}

// spoof sends one UDP datagram from src (any address) to dst through a raw
// socket that writes the IPv4 header itself (needs CAP_NET_RAW and runsc
// --net-raw).
func spoof(src, dst string) error {
	s := net.ParseIP(src).To4()
	d, err := net.ResolveUDPAddr("udp4", dst)
	if s == nil || err != nil {
		return fmt.Errorf("bad source or destination: %s %s", src, dst)
	}
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_RAW)
	if err != nil {
		return fmt.Errorf("raw socket: %w", err)
	}
	defer syscall.Close(fd)
	payload := []byte("spoofed-from-" + src)
	pkt := make([]byte, 28+len(payload))
	pkt[0], pkt[8], pkt[9] = 0x45, 64, syscall.IPPROTO_UDP
	binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
	copy(pkt[12:16], s)
	copy(pkt[16:20], d.IP.To4())
	binary.BigEndian.PutUint16(pkt[10:], packet.Checksum(pkt[:20]))
	binary.BigEndian.PutUint16(pkt[20:], 40000)
	binary.BigEndian.PutUint16(pkt[22:], uint16(d.Port))
	binary.BigEndian.PutUint16(pkt[24:], uint16(8+len(payload)))
	copy(pkt[28:], payload)
	to := &syscall.SockaddrInet4{Port: d.Port}
	copy(to.Addr[:], d.IP.To4())
	if err := syscall.Sendto(fd, pkt, 0, to); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	fmt.Printf("sent from %s\n", src)
	return nil
}

// flood holds tcp connections to dst open while it sends n DNS queries
// for unique names, each from a socket (a source port) of its own, without
// waiting for answers.
func flood(dst, n, tcp string) error {
	var count, tcpCount int
	fmt.Sscan(n, &count)
	fmt.Sscan(tcp, &tcpCount)
	var held []net.Conn
	for i := 0; i < tcpCount; i++ {
		if c, err := net.DialTimeout("tcp4", dst, 200*time.Millisecond); err == nil {
			held = append(held, c)
		}
	}
	sent := 0
	for i := 0; i < count; i++ {
		c, err := net.Dial("udp4", dst)
		if err != nil {
			continue
		}
		q := []byte{byte(i >> 8), byte(i), 1, 0, 0, 1, 0, 0, 0, 0, 0, 0}
		for _, l := range []string{fmt.Sprintf("f%d", i), "flood", "test"} {
			q = append(append(q, byte(len(l))), l...)
		}
		q = append(q, 0, 0, 1, 0, 1)
		if _, err := c.Write(q); err == nil {
			sent++
		}
		c.Close()
	}
	for _, c := range held {
		c.Close()
	}
	fmt.Printf("sent %d queries, held %d tcp connections\n", sent, len(held))
	return nil
}
