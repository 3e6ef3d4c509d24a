// go-cacheprog: a GOCACHEPROG (Go >= 1.24) that layers the go command's build cache over a
// read-only, prebuilt one.
//
//	GOCACHEPROG="/usr/lib/sandboxd/bin/go-cacheprog /usr/lib/sandboxd/go-cache" GOCACHE=/tmp/.cache/go-build
//
// Why: a room's /usr is read-only and GOCACHE must be writable, but building the standard library
// into an empty cache costs ~8 s per room (~25 s of CPU for all of std). Copying the prebuilt
// cache (165 MB) into every room's tmpfs costs memory and time; an overlay needs the jail's help;
// and the go command trims entries older than 5 days from a GOCACHE it manages, which would empty
// a copied or linked cache once the tree is a week old. A GOCACHEPROG is never trimmed by go.
//
// Gets look in $GOCACHE (written by this program) first, then in each read-only directory given
// as an argument; both use the go command's own on-disk layout (xx/<actionID>-a entries,
// xx/<outputID>-d bodies), so the read-only cache is made by a plain `go build std`.
// Puts go to $GOCACHE. Requests are answered in order, one at a time.
package main

import (
	"bufio"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

type request struct {
	ID       int64
	Command  string
	ActionID []byte `json:",omitempty"`
	OutputID []byte `json:",omitempty"`
	BodySize int64  `json:",omitempty"`
	ObjectID []byte `json:",omitempty"`
}

type response struct {
	ID            int64
	Err           string     `json:",omitempty"`
	KnownCommands []string   `json:",omitempty"`
	Miss          bool       `json:",omitempty"`
	OutputID      []byte     `json:",omitempty"`
	Size          int64      `json:",omitempty"`
	Time          *time.Time `json:",omitempty"`
	DiskPath      string     `json:",omitempty"`
}

const hashSize = 32
const entrySize = 2 + 1 + 2*hashSize + 1 + 2*hashSize + 1 + 20 + 1 + 20 + 1

func name(dir string, id []byte, kind string) string {
	return filepath.Join(dir, fmt.Sprintf("%02x", id[0]), fmt.Sprintf("%x-%s", id, kind))
}

// lookup reads an action entry in the go command's format:
// "v1 <hex action> <hex output> <size, 20 wide> <unixnano, 20 wide>\n".
func lookup(dir string, action []byte) (*response, bool) {
	data, err := os.ReadFile(name(dir, action, "a"))
	if err != nil || len(data) != entrySize || string(data[:3]) != "v1 " {
		return nil, false
	}
	fields := strings.Fields(string(data))
	if len(fields) != 5 || fields[1] != hex.EncodeToString(action) {
		return nil, false
	}
	out, err1 := hex.DecodeString(fields[2])
	size, err2 := strconv.ParseInt(fields[3], 10, 64)
	nano, err3 := strconv.ParseInt(fields[4], 10, 64)
	if err1 != nil || err2 != nil || err3 != nil || len(out) != hashSize {
		return nil, false
	}
	path := name(dir, out, "d")
	if size > 0 {
		st, err := os.Stat(path)
		if err != nil || st.Size() != size {
			return nil, false
		}
	}
	t := time.Unix(0, nano)
	return &response{OutputID: out, Size: size, Time: &t, DiskPath: path}, true
}

func writeAtomic(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o777); err != nil {
		return err
	}
	tmp := fmt.Sprintf("%s.tmp%d", path, os.Getpid())
	if err := os.WriteFile(tmp, data, 0o666); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func put(dir string, req *request, body []byte) (*response, error) {
	if len(req.ActionID) != hashSize || len(req.OutputID) != hashSize {
		return nil, errors.New("go-cacheprog: bad ActionID or OutputID length")
	}
	if int64(len(body)) != req.BodySize {
		return nil, fmt.Errorf("go-cacheprog: body is %d bytes, expected %d", len(body), req.BodySize)
	}
	path := name(dir, req.OutputID, "d")
	if err := writeAtomic(path, body); err != nil {
		return nil, err
	}
	now := time.Now()
	entry := fmt.Sprintf("v1 %x %x %20d %20d\n", req.ActionID, req.OutputID, len(body), now.UnixNano())
	if err := writeAtomic(name(dir, req.ActionID, "a"), []byte(entry)); err != nil {
		return nil, err
	}
	return &response{OutputID: req.OutputID, Size: int64(len(body)), Time: &now, DiskPath: path}, nil
}

func main() {
	rw := os.Getenv("GOCACHE")
	if rw == "" || !filepath.IsAbs(rw) {
		fmt.Fprintln(os.Stderr, "go-cacheprog: GOCACHE must be set to an absolute, writable directory")
		os.Exit(2)
	}
	layers := append([]string{rw}, os.Args[1:]...)

	in := json.NewDecoder(bufio.NewReaderSize(os.Stdin, 1<<16))
	w := bufio.NewWriter(os.Stdout)
	out := json.NewEncoder(w)
	send := func(r *response) {
		if err := out.Encode(r); err != nil {
			os.Exit(1)
		}
		if err := w.Flush(); err != nil {
			os.Exit(1)
		}
	}
	send(&response{ID: 0, KnownCommands: []string{"get", "put", "close"}})

	for {
		var req request
		if err := in.Decode(&req); err != nil {
			if err == io.EOF {
				return
			}
			fmt.Fprintln(os.Stderr, "go-cacheprog: reading request:", err)
			os.Exit(1)
		}
		var body []byte
		if req.Command == "put" && req.BodySize > 0 {
			if err := in.Decode(&body); err != nil { // a base64 JSON string on its own line
				fmt.Fprintln(os.Stderr, "go-cacheprog: reading body:", err)
				os.Exit(1)
			}
		}
		res := &response{}
		switch req.Command {
		case "get":
			res.Miss = true
			if len(req.ActionID) == hashSize {
				for _, dir := range layers {
					if hit, ok := lookup(dir, req.ActionID); ok {
						res = hit
						break
					}
				}
			}
		case "put":
			r, err := put(rw, &req, body)
			if err != nil {
				res.Err = err.Error()
			} else {
				res = r
			}
		case "close":
			res.ID = req.ID
			send(res)
			return
		default:
			res.Err = "go-cacheprog: unknown command " + req.Command
		}
		res.ID = req.ID
		send(res)
	}
}
