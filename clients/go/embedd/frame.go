package embedd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"

	"github.com/vmihailenco/msgpack/v5"
	"github.com/vmihailenco/msgpack/v5/msgpcode"
)

// DefaultMaxFrame is the daemon's default max_frame (64 MiB).
const DefaultMaxFrame = 64 << 20

const headerSize = 4

// errFrame marks a framing violation by the peer; the connection cannot be
// trusted after it.
type errFrame struct{ msg string }

func (e *errFrame) Error() string { return e.msg }

// encodeFrame packs one message as a frame (length prefix + msgpack map).
// Map keys are sorted so equal requests give equal bytes.
func encodeFrame(msg map[string]any, maxFrame int) ([]byte, error) {
	var buf bytes.Buffer
	buf.Write(make([]byte, headerSize))
	enc := msgpack.NewEncoder(&buf)
	enc.SetSortMapKeys(true)
	if err := enc.Encode(msg); err != nil {
		return nil, fmt.Errorf("embedd: encoding request: %w", err)
	}
	b := buf.Bytes()
	n := len(b) - headerSize
	if n > maxFrame {
		return nil, localError(CodeTooLarge, nil,
			"the request frame is %d bytes, over the %d-byte frame limit", n, maxFrame)
	}
	binary.BigEndian.PutUint32(b, uint32(n))
	return b, nil
}

// readFrame reads one frame body. It returns io.EOF for a clean close
// between frames and *errFrame for a bad length or a frame cut short; it
// checks the length before allocating anything.
func readFrame(r io.Reader, maxFrame int) ([]byte, error) {
	var hdr [headerSize]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, &errFrame{"the frame header was cut short by EOF"}
		}
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n == 0 || uint64(n) > uint64(maxFrame) {
		return nil, &errFrame{fmt.Sprintf("frame length %d is outside 1..%d bytes", n, maxFrame)}
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, &errFrame{fmt.Sprintf("a %d-byte frame was cut short by EOF", n)}
		}
		return nil, err
	}
	return body, nil
}

// response is one decoded response frame; Result stays raw until the caller
// knows which type it wants.
type response struct {
	ID     any                `msgpack:"id"`
	OK     bool               `msgpack:"ok"`
	Result msgpack.RawMessage `msgpack:"result"`
	Error  *wireError         `msgpack:"error"`
	More   bool               `msgpack:"more"`
}

type wireError struct {
	Code    string `msgpack:"code"`
	Message string `msgpack:"message"`
}

func (r *response) err() *Error {
	if r.Error == nil {
		return &Error{Code: CodeInternal, Message: "the daemon answered ok: false without an error map"}
	}
	return &Error{Code: Code(r.Error.Code), Message: r.Error.Message}
}

// decodeResponse decodes a frame body, insisting on a map: msgpack v5 would
// otherwise happily decode an array into a struct by position.
func decodeResponse(body []byte) (*response, error) {
	rd := bytes.NewReader(body) // a ByteScanner, so the decoder reads it directly, unbuffered
	dec := msgpack.NewDecoder(rd)
	dec.UseLooseInterfaceDecoding(true)
	c, err := dec.PeekCode()
	if err != nil {
		return nil, &errFrame{fmt.Sprintf("frame body is not msgpack: %v", err)}
	}
	if !msgpcode.IsFixedMap(c) && c != msgpcode.Map16 && c != msgpcode.Map32 {
		return nil, &errFrame{fmt.Sprintf("frame body is msgpack code 0x%02x, not a map", c)}
	}
	var r response
	if err := dec.Decode(&r); err != nil {
		return nil, &errFrame{fmt.Sprintf("frame body is not a valid response map: %v", err)}
	}
	if rd.Len() > 0 {
		return nil, &errFrame{fmt.Sprintf("frame body has %d bytes after its map", rd.Len())}
	}
	return &r, nil
}

// responseID turns a decoded id into the client's numeric id. Loose decoding
// gives int64 or uint64; the client only ever sends positive integers.
func responseID(v any) (uint64, bool) {
	switch x := v.(type) {
	case uint64:
		return x, true
	case int64:
		if x >= 0 {
			return uint64(x), true
		}
	}
	return 0, false
}

// Vector is an embedding. It is a []float32 underneath and assignable to
// one; on the wire it is decoded from either vector format of the contract
// (a little-endian float32 bin, or a msgpack array of numbers) and always
// encoded as the bin.
type Vector []float32

var (
	_ msgpack.CustomDecoder = (*Vector)(nil)
	_ msgpack.CustomEncoder = Vector(nil)
)

// DecodeMsgpack accepts both vector formats, and nil as an empty vector.
func (v *Vector) DecodeMsgpack(dec *msgpack.Decoder) error {
	c, err := dec.PeekCode()
	if err != nil {
		return err
	}
	switch {
	case c == msgpcode.Nil:
		*v = nil
		return dec.DecodeNil()
	case msgpcode.IsBin(c):
		b, err := dec.DecodeBytes()
		if err != nil {
			return err
		}
		f, err := decodeFloat32LE(b)
		if err != nil {
			return err
		}
		*v = f
		return nil
	case msgpcode.IsFixedArray(c) || c == msgpcode.Array16 || c == msgpcode.Array32:
		n, err := dec.DecodeArrayLen()
		if err != nil {
			return err
		}
		out := make([]float32, n)
		for i := range out {
			f, err := dec.DecodeFloat64()
			if err != nil {
				return fmt.Errorf("embedd: vector element %d: %w", i, err)
			}
			out[i] = float32(f)
		}
		*v = out
		return nil
	}
	return fmt.Errorf("embedd: a vector must be a bin or an array, got msgpack code 0x%02x", c)
}

// EncodeMsgpack writes the contract's default vector format.
func (v Vector) EncodeMsgpack(enc *msgpack.Encoder) error {
	return enc.EncodeBytes(encodeFloat32LE(v))
}

func decodeFloat32LE(b []byte) ([]float32, error) {
	if len(b)%4 != 0 {
		return nil, fmt.Errorf("embedd: a vector bin of %d bytes is not a whole number of float32 values", len(b))
	}
	out := make([]float32, len(b)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
	}
	return out, nil
}

func encodeFloat32LE(v []float32) []byte {
	b := make([]byte, 4*len(v))
	for i, f := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(f))
	}
	return b
}
