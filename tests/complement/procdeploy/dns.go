package procdeploy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
)

// dnsStub is a tiny UDP DNS server that answers every query with NXDOMAIN.
//
// Homeserver processes get a resolv.conf naming only this server. Names they
// need (hsN, Complement's hostname) come from their private hosts file; SRV
// lookups such as _matrix-fed._tcp.hs2 then fail at once, as they do on
// Docker's embedded DNS, instead of timing out or leaving the machine.
type dnsStub struct {
	conn *net.UDPConn
	log  io.Writer // may be nil

	mu      sync.Mutex
	queries map[string]int // "TYPE name" -> count, for the run's dns.log
	wg      sync.WaitGroup
}

func startDNSStub(ip string, log io.Writer) (*dnsStub, error) {
	conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.ParseIP(ip), Port: 53})
	if err != nil {
		return nil, err
	}
	s := &dnsStub{conn: conn, log: log, queries: map[string]int{}}
	s.wg.Add(1)
	go s.serve()
	return s, nil
}

func (s *dnsStub) serve() {
	defer s.wg.Done()
	buf := make([]byte, 4096)
	for {
		n, addr, err := s.conn.ReadFromUDP(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		resp, name, qtype, err := nxdomainResponse(buf[:n])
		if err != nil {
			continue
		}
		s.mu.Lock()
		s.queries[qtypeName(qtype)+" "+name]++
		s.mu.Unlock()
		if s.log != nil {
			fmt.Fprintf(s.log, "%s %s -> NXDOMAIN\n", qtypeName(qtype), name)
		}
		_, _ = s.conn.WriteToUDP(resp, addr)
	}
}

// Queries returns how often each "TYPE name" was asked.
func (s *dnsStub) Queries() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]int, len(s.queries))
	for k, v := range s.queries {
		out[k] = v
	}
	return out
}

func (s *dnsStub) Close() {
	_ = s.conn.Close()
	s.wg.Wait()
}

// nxdomainResponse builds the NXDOMAIN answer to a DNS query: same ID, the
// question echoed, no records. It returns the queried name and type too.
func nxdomainResponse(q []byte) ([]byte, string, uint16, error) {
	if len(q) < 12 {
		return nil, "", 0, errors.New("short DNS message")
	}
	flags := binary.BigEndian.Uint16(q[2:4])
	if flags&0x8000 != 0 {
		return nil, "", 0, errors.New("not a query")
	}
	qdcount := binary.BigEndian.Uint16(q[4:6])
	if qdcount != 1 {
		return nil, "", 0, errors.New("want exactly one question")
	}
	// Walk the question's name: length-prefixed labels ending in a zero byte.
	off := 12
	var labels []string
	for {
		if off >= len(q) {
			return nil, "", 0, errors.New("truncated name")
		}
		l := int(q[off])
		if l == 0 {
			off++
			break
		}
		if l&0xC0 != 0 || off+1+l > len(q) {
			return nil, "", 0, errors.New("bad label")
		}
		labels = append(labels, string(q[off+1:off+1+l]))
		off += 1 + l
	}
	if off+4 > len(q) {
		return nil, "", 0, errors.New("truncated question")
	}
	qtype := binary.BigEndian.Uint16(q[off : off+2])
	off += 4 // type + class

	resp := make([]byte, off)
	copy(resp, q[:off])
	opcode := flags & 0x7800
	rd := flags & 0x0100
	// QR=1, same opcode, RD copied, RA=1, RCODE=3 (NXDOMAIN).
	binary.BigEndian.PutUint16(resp[2:4], 0x8000|opcode|rd|0x0080|3)
	binary.BigEndian.PutUint16(resp[4:6], 1)  // QDCOUNT
	binary.BigEndian.PutUint16(resp[6:8], 0)  // ANCOUNT
	binary.BigEndian.PutUint16(resp[8:10], 0) // NSCOUNT
	binary.BigEndian.PutUint16(resp[10:12], 0)
	return resp, strings.Join(labels, "."), qtype, nil
}

func qtypeName(t uint16) string {
	switch t {
	case 1:
		return "A"
	case 28:
		return "AAAA"
	case 33:
		return "SRV"
	case 16:
		return "TXT"
	case 5:
		return "CNAME"
	default:
		return fmt.Sprintf("TYPE%d", t)
	}
}
