package embedd

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"reflect"
	"testing"
	"testing/quick"

	"github.com/vmihailenco/msgpack/v5"
)

func TestFrameRoundTrip(t *testing.T) {
	msg := map[string]any{"id": uint64(7), "op": "embed_text", "text": "héllo", "data": []byte{0, 1, 2}}
	frame, err := encodeFrame(msg, DefaultMaxFrame)
	if err != nil {
		t.Fatal(err)
	}
	if n := binary.BigEndian.Uint32(frame); int(n) != len(frame)-4 {
		t.Fatalf("length prefix %d, body %d bytes", n, len(frame)-4)
	}
	body, err := readFrame(bytes.NewReader(frame), DefaultMaxFrame)
	if err != nil {
		t.Fatal(err)
	}
	var back map[string]any
	if err := msgpack.Unmarshal(body, &back); err != nil {
		t.Fatal(err)
	}
	if back["op"] != "embed_text" || back["text"] != "héllo" || !bytes.Equal(back["data"].([]byte), []byte{0, 1, 2}) {
		t.Fatalf("round trip changed the message: %#v", back)
	}
	// []byte must go out as msgpack bin (0xc4), the contract's binary type.
	if !bytes.Contains(body, []byte{0xc4, 3, 0, 1, 2}) {
		t.Fatalf("data was not encoded as bin8: % x", body)
	}
}

func TestFrameDeterministic(t *testing.T) {
	msg := map[string]any{"b": 1, "a": 2, "c": 3, "op": "x", "id": 1}
	first, _ := encodeFrame(msg, DefaultMaxFrame)
	for i := 0; i < 20; i++ {
		again, _ := encodeFrame(msg, DefaultMaxFrame)
		if !bytes.Equal(first, again) {
			t.Fatal("the same request encoded to different bytes")
		}
	}
}

func TestFrameTooLargeToSend(t *testing.T) {
	_, err := encodeFrame(map[string]any{"data": make([]byte, 2000)}, 1024)
	if !IsCode(err, CodeTooLarge) {
		t.Fatalf("want too_large, got %v", err)
	}
}

func TestReadFrameRejects(t *testing.T) {
	hdr := func(n uint32) []byte {
		b := make([]byte, 4)
		binary.BigEndian.PutUint32(b, n)
		return b
	}
	cases := []struct {
		name string
		in   []byte
		eof  bool
	}{
		{"clean EOF", nil, true},
		{"zero length", hdr(0), false},
		{"over max_frame", hdr(1025), false},
		{"header cut short", []byte{0, 0}, false},
		{"body cut short", append(hdr(10), 1, 2, 3), false},
		// A huge length must be refused before anything is allocated for it.
		{"4 GiB length", hdr(math.MaxUint32), false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := readFrame(bytes.NewReader(tc.in), 1024)
			if tc.eof {
				if !errors.Is(err, io.EOF) {
					t.Fatalf("want io.EOF, got %v", err)
				}
				return
			}
			var fe *errFrame
			if !errors.As(err, &fe) {
				t.Fatalf("want a frame error, got %v", err)
			}
		})
	}
}

func TestReadFrameProperty(t *testing.T) {
	// Any sequence of frames written back to back reads back the same bodies.
	f := func(bodies [][]byte) bool {
		var stream bytes.Buffer
		var want [][]byte
		for _, b := range bodies {
			if len(b) == 0 {
				continue
			}
			var hdr [4]byte
			binary.BigEndian.PutUint32(hdr[:], uint32(len(b)))
			stream.Write(hdr[:])
			stream.Write(b)
			want = append(want, b)
		}
		for _, w := range want {
			got, err := readFrame(&stream, DefaultMaxFrame)
			if err != nil || !bytes.Equal(got, w) {
				return false
			}
		}
		_, err := readFrame(&stream, DefaultMaxFrame)
		return errors.Is(err, io.EOF)
	}
	if err := quick.Check(f, nil); err != nil {
		t.Fatal(err)
	}
}

func pack(t *testing.T, v any) []byte {
	t.Helper()
	b, err := msgpack.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDecodeResponse(t *testing.T) {
	r, err := decodeResponse(pack(t, map[string]any{
		"id": 42, "ok": true, "result": map[string]any{"version": "0.1.0", "protocol": 1, "uptime_s": 1.5}, "more": true,
	}))
	if err != nil {
		t.Fatal(err)
	}
	if id, ok := responseID(r.ID); !ok || id != 42 || !r.OK || !r.More {
		t.Fatalf("bad header: %+v", r)
	}
	var ping PingResult
	if err := msgpack.Unmarshal(r.Result, &ping); err != nil {
		t.Fatal(err)
	}
	if ping != (PingResult{Version: "0.1.0", Protocol: 1, UptimeS: 1.5}) {
		t.Fatalf("result: %+v", ping)
	}

	r, err = decodeResponse(pack(t, map[string]any{"id": nil, "ok": false, "error": map[string]any{"code": "bad_frame", "message": "m"}}))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := responseID(r.ID); ok {
		t.Fatal("a nil id must not match a request")
	}
	if e := r.err(); e.Code != CodeBadFrame || e.Message != "m" {
		t.Fatalf("error: %+v", e)
	}
	if e := (&response{OK: false}).err(); e.Code != CodeInternal {
		t.Fatalf("ok:false without error map: %+v", e)
	}

	for name, body := range map[string][]byte{
		"array":         pack(t, []any{1, true}),
		"int":           pack(t, 5),
		"trailing":      append(pack(t, map[string]any{"id": 1, "ok": true}), 0xc0),
		"truncated map": pack(t, map[string]any{"id": 1, "ok": true})[:3],
		"empty":         {},
	} {
		if _, err := decodeResponse(body); err == nil {
			t.Errorf("%s: decoded a body that is not one msgpack map", name)
		}
	}
}

func TestResponseIDTypes(t *testing.T) {
	for _, v := range []any{int64(3), uint64(3)} {
		if id, ok := responseID(v); !ok || id != 3 {
			t.Errorf("%T: %d %v", v, id, ok)
		}
	}
	for _, v := range []any{nil, "3", int64(-1), 3.0} {
		if _, ok := responseID(v); ok {
			t.Errorf("%#v must not match a request id", v)
		}
	}
}

func TestVectorDecodeBin(t *testing.T) {
	want := []float32{1, -2.5, float32(math.Inf(1)), 0, math.SmallestNonzeroFloat32}
	raw := make([]byte, 0, 4*len(want))
	for _, f := range want {
		raw = binary.LittleEndian.AppendUint32(raw, math.Float32bits(f))
	}
	var v Vector
	if err := msgpack.Unmarshal(pack(t, raw), &v); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual([]float32(v), want) {
		t.Fatalf("got %v want %v", v, want)
	}
}

func TestVectorDecodeList(t *testing.T) {
	// Python's msgpack sends floats as float64, and 0 or 1 may come as ints.
	var v Vector
	if err := msgpack.Unmarshal(pack(t, []any{0.5, float32(-1.25), 3, int8(-4)}), &v); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual([]float32(v), []float32{0.5, -1.25, 3, -4}) {
		t.Fatalf("got %v", v)
	}
	v = Vector{1}
	if err := msgpack.Unmarshal(pack(t, nil), &v); err != nil || v != nil {
		t.Fatalf("nil: %v %v", v, err)
	}
}

func TestVectorDecodeRejects(t *testing.T) {
	var v Vector
	if err := msgpack.Unmarshal(pack(t, []byte{1, 2, 3, 4, 5}), &v); err == nil {
		t.Fatal("accepted a bin that is not whole float32 values")
	}
	if err := msgpack.Unmarshal(pack(t, "abcd"), &v); err == nil {
		t.Fatal("accepted a string as a vector")
	}
	if err := msgpack.Unmarshal(pack(t, []any{"x"}), &v); err == nil {
		t.Fatal("accepted a list of strings as a vector")
	}
}

func TestVectorRoundTripProperty(t *testing.T) {
	f := func(in []float32) bool {
		b, err := msgpack.Marshal(Vector(in))
		if err != nil {
			return false
		}
		var out Vector
		if err := msgpack.Unmarshal(b, &out); err != nil || len(out) != len(in) {
			return false
		}
		for i := range in {
			if math.Float32bits(in[i]) != math.Float32bits(out[i]) {
				return false
			}
		}
		return true
	}
	if err := quick.Check(f, nil); err != nil {
		t.Fatal(err)
	}
}

func TestVectorInResultStruct(t *testing.T) {
	body := pack(t, map[string]any{
		"duration_s": 3.0,
		"models": map[string]any{
			"muq":    map[string]any{"dim": 2, "windows": 1, "vector": encodeFloat32LE([]float32{0.6, 0.8})},
			"latent": map[string]any{"dim": 2, "windows": 9, "vector": []float64{1, 0}},
		},
	})
	var res EmbedFileResult
	if err := msgpack.Unmarshal(body, &res); err != nil {
		t.Fatal(err)
	}
	if got := []float32(res.Models["muq"].Vector); !reflect.DeepEqual(got, []float32{0.6, 0.8}) {
		t.Fatalf("muq vector %v", got)
	}
	if got := res.Models["latent"]; got.Windows != 9 || !reflect.DeepEqual([]float32(got.Vector), []float32{1, 0}) {
		t.Fatalf("latent %+v", got)
	}
}

func TestErrorHelpers(t *testing.T) {
	err := fmt.Errorf("search: %w", &Error{Code: CodeOverloaded, Message: "queue full"})
	var e *Error
	if !errors.As(err, &e) || e.Code != CodeOverloaded || !IsRetryable(err) || !IsCode(err, CodeOverloaded) {
		t.Fatal("overloaded must be a retryable *Error")
	}
	if IsRetryable(&Error{Code: CodeNotFound}) || IsRetryable(errors.New("x")) {
		t.Fatal("not_found and plain errors are not retryable")
	}
	cause := io.ErrUnexpectedEOF
	if le := localError(CodeUnavailable, cause, "gone"); !errors.Is(le, cause) || le.Error() != "embedd: unavailable: gone" {
		t.Fatalf("local error: %v", le)
	}
}
