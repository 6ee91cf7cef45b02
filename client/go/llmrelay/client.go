// Package llmrelay is the Go client of the llmrelay gateway: one gRPC contract (llmrelay.v1) for chat completions
// over many LLM backends.
//
//	client, err := llmrelay.Dial("127.0.0.1:50051") // plaintext: a loopback target
//	if err != nil { ... }
//	defer client.Close()
//	stream, err := client.Stream(ctx, &llmrelayv1.StreamCompleteRequest{
//		Messages: []*llmrelayv1.Message{llmrelay.User("Hello")},
//	})
//	for {
//		chunk, err := stream.Recv()
//		if err == io.EOF { break }
//		if err != nil { ... }
//		fmt.Print(chunk.GetDelta().GetContent())
//	}
//
// Collect reads such a stream to its end and returns the whole answer as Complete would, with the gateway asked to
// start over on the next backend when an upstream's stream breaks midway (on_interrupt = INTERRUPT_POLICY_RESTART):
//
//	answer, err := client.Collect(ctx, req, func(chunk *llmrelayv1.StreamCompleteResponse) {
//		fmt.Print(chunk.GetDelta().GetContent()) // as it comes
//	})
//
// On a raw Stream whose request asked for INTERRUPT_POLICY_RESTART, a message with chunk.GetRestart() != nil is
// the restart marker: every delta received before it is void, the deltas after it are the whole answer. Assembler
// folds a stream's messages into the answer, markers included, for callers that read the stream themselves.
//
// Deadlines come from the context of each call; a call whose context has none gets the client's default timeout
// (WithTimeout), unless its context says it wants none (WithoutDeadline). Failed calls return an *Error, which carries
// the google.rpc details of the status (ErrorInfo, RetryInfo, BadRequest) and still works with status.Code and
// status.FromError. The channel itself retries a call that failed with UNAVAILABLE before it got an answer (the
// service config llmrelayv1.ServiceConfigJSON, which WithServiceConfig replaces), waiting as long as the gateway's
// grpc-retry-pushback-ms says.
//
// Agent runs the tool loop of an agent (call the model, run the tools it asks for, call again) with Tools made by
// NewTool, and a Conversation keeps a chat's messages within a token budget.
package llmrelay

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/protoadapt"
	"google.golang.org/protobuf/reflect/protoreflect"

	llmrelayv1 "github.com/llmrelay/llmrelay/client/go/llmrelay/v1"
)

// DefaultTimeout bounds a call whose context has no deadline, unless WithTimeout says otherwise.
const DefaultTimeout = 120 * time.Second

// CallerHeader is the metadata key that names the caller in the gateway's usage ledger.
const CallerHeader = "x-llmrelay-caller"

// Client calls one gateway over one gRPC channel. It is safe for concurrent use; Close it when done.
type Client struct {
	conn    *grpc.ClientConn
	rpc     llmrelayv1.LLMServiceClient
	timeout time.Duration
	// headers holds the metadata sent with every call, alternating keys and values, behind a pointer: fmt prints a
	// pointer within a struct as its address, so a Client printed whole (%v of *client, which Format does not cover)
	// shows no value, such as the caller's key in WithHeader("authorization", "Bearer KEY").
	headers *[]string
	// securityHint says which transport security Dial chose by itself and how to choose another; "" when the caller
	// chose. It completes the message of a call that could not reach the gateway.
	securityHint string
	// certificateHint says what a gateway with mutual TLS wants of this client, given none or one it did not take;
	// "" over plaintext or the caller's own credentials (what they present is not known). It completes the message
	// of a call whose TLS connection the gateway closed without a word (see closedWithoutAWord).
	certificateHint string
	// reached is set once a call has heard from the gateway (its response headers, a message, or an error status of
	// its own, which comes trailers-only): the transport security is the gateway's, and a later call that cannot
	// reach it (the gateway gone, or restarting) gets no hint.
	reached atomic.Bool
}

type options struct {
	creds              credentials.TransportCredentials
	timeout            time.Duration
	headers            []string
	serviceConfig      string
	unaryInterceptors  []grpc.UnaryClientInterceptor
	streamInterceptors []grpc.StreamClientInterceptor
	dialOptions        []grpc.DialOption
	// tls is the configuration of creds where WithTLS or Dial's rule made them (an empty one for nil); nil for other
	// credentials.
	tls *tls.Config
}

// Option configures Dial.
type Option func(*options)

// WithInsecure connects in plaintext, for a gateway inside a trusted network (Dial does so by itself only for a
// loopback target: see IsLoopbackTarget).
func WithInsecure() Option {
	return func(o *options) { o.creds, o.tls = insecure.NewCredentials(), nil }
}

// WithTLS connects over TLS with the given configuration (nil: the system's root certificates): RootCAs for a private
// CA, Certificates for a client certificate (TLSConfig reads both from PEM files). TLS with the system's roots is
// what Dial does by itself for a target that is not loopback; WithTLS also asks for TLS to a loopback one.
func WithTLS(config *tls.Config) Option {
	return func(o *options) {
		o.creds, o.tls = credentials.NewTLS(config), config
		if config == nil {
			o.tls = &tls.Config{}
		}
	}
}

// WithTransportCredentials connects with any gRPC transport credentials (mutual TLS, ALTS, ...). What they present
// is not known to the client, so a failed call's message gives no hint of client certificates (WithTLS's does).
func WithTransportCredentials(creds credentials.TransportCredentials) Option {
	return func(o *options) { o.creds, o.tls = creds, nil }
}

// WithTimeout sets the deadline of calls whose context has none (DefaultTimeout by default; 0 for none; Dial refuses
// a negative one). A single call goes without one through WithoutDeadline.
func WithTimeout(d time.Duration) Option {
	return func(o *options) { o.timeout = d }
}

// WithCaller names the caller in the gateway's usage ledger (the x-llmrelay-caller metadata).
func WithCaller(name string) Option {
	return WithHeader(CallerHeader, name)
}

// WithHeader sends a metadata entry with every call (for example "authorization", "Bearer KEY"), unless the call's
// context carries outgoing metadata of that key: then the call's value goes in its place. The key is taken in any case
// and sent in lower case, as gRPC sends keys; a later WithHeader (or WithCaller) of the same key replaces the earlier
// one's value, as a later option of Dial does. The value is printable ASCII (any bytes for a key ending -bin): Dial
// refuses another, naming the key but not the value, and a call refuses one in its own outgoing metadata alike, with
// an InvalidArgument *Error. Both refuse likewise a key gRPC does not send as given: an HTTP/1 connection-specific one
// (connection, keep-alive, proxy-connection, transfer-encoding, upgrade, http2-settings), which HTTP/2 forbids, and
// te, content-type and user-agent, which grpc-go replaces with its own (grpc.WithUserAgent, through WithDialOptions,
// sets the user agent); Dial also refuses a key starting grpc-.
func WithHeader(key, value string) Option {
	return func(o *options) {
		key := strings.ToLower(key)
		// Sending both would leave the choice to the reader (the gateway takes the first, proxies may take the last).
		for i := 0; i < len(o.headers); i += 2 {
			if o.headers[i] == key {
				o.headers[i+1] = value
				return
			}
		}
		o.headers = append(o.headers, key, value)
	}
}

// WithServiceConfig replaces the channel's default service config, llmrelayv1.ServiceConfigJSON (retry UNAVAILABLE
// up to three attempts with backoff, honouring the gateway's grpc-retry-pushback-ms), with serviceConfigJSON; ""
// installs none, so nothing is retried. A service config from the name resolver (DNS TXT records) still takes
// precedence over either, as in grpc.WithDefaultServiceConfig.
func WithServiceConfig(serviceConfigJSON string) Option {
	return func(o *options) { o.serviceConfig = serviceConfigJSON }
}

// WithUnaryInterceptors adds interceptors to the unary calls (Complete, CountTokens, Embed, Health, GetUsage), the
// first one outermost, after any earlier WithUnaryInterceptors.
func WithUnaryInterceptors(interceptors ...grpc.UnaryClientInterceptor) Option {
	return func(o *options) { o.unaryInterceptors = append(o.unaryInterceptors, interceptors...) }
}

// WithStreamInterceptors adds interceptors to the streaming calls (Stream, Collect), the first one outermost.
func WithStreamInterceptors(interceptors ...grpc.StreamClientInterceptor) Option {
	return func(o *options) { o.streamInterceptors = append(o.streamInterceptors, interceptors...) }
}

// WithDialOptions passes options through to grpc.NewClient (keepalive, a custom resolver, ...), after this package's
// own, so that they win where both set the same thing.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) { o.dialOptions = append(o.dialOptions, opts...) }
}

// Dial creates a client for the gateway at target ("host:port", or any gRPC target such as "dns:///host:port").
// Without WithInsecure, WithTLS or WithTransportCredentials, it connects in plaintext to a loopback target
// (IsLoopbackTarget) and over TLS with the system's roots to any other. Like grpc.NewClient, it does not wait for
// the connection: the first call connects. It refuses, as the Python and TypeScript SDKs do, an http:// or https://
// URL and a port past 65535, which no call could reach, with an error that names the problem, not the target.
func Dial(target string, opts ...Option) (*Client, error) {
	// Not showing the target, which may hold a password (a URL's).
	if problem := targetProblem(target); problem != "" {
		return nil, errors.New("llmrelay: target: " + problem)
	}
	o := options{timeout: DefaultTimeout, serviceConfig: llmrelayv1.ServiceConfigJSON}
	for _, opt := range opts {
		if opt != nil { // as a nil grpc.DialOption is none
			opt(&o)
		}
	}
	// Else it meant no deadline at all, as 0 does.
	if o.timeout < 0 {
		return nil, fmt.Errorf("llmrelay: WithTimeout must be a duration > 0, or 0 (no deadline), not %s", o.timeout)
	}
	for i := 0; i < len(o.headers); i += 2 {
		// WithHeader lower-cased the key, so that "GRPC-Timeout" is refused as "grpc-timeout" is: grpc-go would drop it,
		// or send it in place of its own.
		if strings.HasPrefix(o.headers[i], "grpc-") {
			return nil, fmt.Errorf("llmrelay: WithHeader key %q: keys starting grpc- are gRPC's own", o.headers[i])
		}
		if problem := headerKeyProblem(o.headers[i]); problem != "" {
			return nil, fmt.Errorf("llmrelay: WithHeader key %q: %s", o.headers[i], problem)
		}
		// Else every call fails Internal, "header key ... contains value with non-printable ASCII characters". The
		// value is not shown: it may be a key to the gateway (read from a file, with its newline).
		if !validHeaderValue(o.headers[i], o.headers[i+1]) {
			return nil, fmt.Errorf("llmrelay: WithHeader %q: gRPC takes only printable ASCII text as a value (value not shown)",
				o.headers[i])
		}
	}
	var securityHint string
	if o.creds == nil {
		if IsLoopbackTarget(target) {
			o.creds = insecure.NewCredentials()
			securityHint = "the client connected in plaintext, its default for a loopback target; " +
				"for a gateway that serves TLS, dial with llmrelay.WithTLS"
		} else {
			o.creds, o.tls = credentials.NewTLS(nil), &tls.Config{}
			securityHint = "the client connected over TLS with the system's roots, its default for a target that is " +
				"not loopback; for a plaintext gateway dial with llmrelay.WithInsecure, for a private CA with llmrelay.WithTLS"
		}
	}
	// Read now, as credentials.NewTLS took a copy: what the client presents is the configuration as it is now.
	var certificateHint string
	if o.tls != nil {
		if len(o.tls.Certificates) == 0 && o.tls.GetClientCertificate == nil {
			certificateHint = "if the gateway asks for a client certificate (mutual TLS), this client gave none: dial " +
				"with llmrelay.WithTLS and a tls.Config whose Certificates hold one its server.tls.client_ca_file trusts"
		} else {
			certificateHint = "if the gateway asks for a client certificate (mutual TLS), it did not take this " +
				"client's: it must be issued by a CA in the gateway's server.tls.client_ca_file"
		}
	}
	dialOptions := []grpc.DialOption{
		// Answers of any size: the gateway bounds them by its server.max_message_bytes, which an operator raises for
		// large images, and with it its answers (gRPC's default of 4 MiB failed a large Embed after it was billed).
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32)),
		grpc.WithTransportCredentials(o.creds),
		grpc.WithChainUnaryInterceptor(o.unaryInterceptors...),
		grpc.WithChainStreamInterceptor(o.streamInterceptors...),
	}
	if o.serviceConfig != "" {
		dialOptions = append(dialOptions, grpc.WithDefaultServiceConfig(o.serviceConfig))
	}
	conn, err := grpc.NewClient(target, append(dialOptions, o.dialOptions...)...)
	if err != nil {
		return nil, err
	}
	headers := o.headers
	return &Client{
		conn:            conn,
		rpc:             llmrelayv1.NewLLMServiceClient(conn),
		timeout:         o.timeout,
		headers:         &headers,
		securityHint:    securityHint,
		certificateHint: certificateHint,
	}, nil
}

// noDeadlineKey marks a context whose call is to go without the client's default deadline.
type noDeadlineKey struct{}

// WithoutDeadline returns a context whose calls go without a deadline: the client adds none where ctx has none
// (a deadline ctx has, or a child of it sets, still applies). For a stream the caller reads as long as it likes;
// end it with Close or by cancelling ctx.
func WithoutDeadline(ctx context.Context) context.Context {
	return context.WithValue(ctx, noDeadlineKey{}, true)
}

// Close closes the channel; calls in flight fail with CANCELED.
func (c *Client) Close() error {
	return c.conn.Close()
}

// Format prints the client for every verb of fmt (%v, %+v, %#v, %s, ...) as its target, default timeout and the keys
// of its headers, never their values: WithHeader("authorization", "Bearer KEY") carries the caller's key to the
// gateway, and fmt's own printing of the struct showed it in clear, in a log line or a panic's message.
func (c *Client) Format(f fmt.State, verb rune) {
	if c == nil {
		if verb == 'v' && f.Flag('#') {
			fmt.Fprint(f, "(*llmrelay.Client)(nil)")
		} else {
			fmt.Fprint(f, "<nil>")
		}
		return
	}
	keys := make([]string, 0, len(*c.headers)/2)
	for i := 0; i < len(*c.headers); i += 2 {
		keys = append(keys, (*c.headers)[i])
	}
	fmt.Fprintf(f, "&llmrelay.Client{target: %q, timeout: %s, headers: %q (values not shown)}",
		c.conn.Target(), c.timeout, keys)
}

// Conn is the underlying channel, for other services on the same gateway (grpc.health.v1, say). Its calls, as
// Stub's, carry neither the client's headers (WithHeader, WithCaller) nor its default timeout.
func (c *Client) Conn() *grpc.ClientConn {
	return c.conn
}

// Stub is the generated client, for anything this package does not wrap. Its calls go over the client's channel
// (its TLS and retry policy) but carry neither the client's headers (WithHeader, WithCaller: a key among them) nor
// its default timeout, and fail with grpc-go's errors (ParseError reads them): give ctx its metadata and deadline.
func (c *Client) Stub() llmrelayv1.LLMServiceClient {
	return c.rpc
}

// callContext adds the client's headers that ctx's outgoing metadata does not set, and its default deadline when ctx
// has none. It refuses, with an InvalidArgument *Error, a call that grpc-go would fail Internal as though the gateway
// had, in words that name no field or no key: req with text that is not UTF-8, or ctx with metadata gRPC cannot send.
func (c *Client) callContext(ctx context.Context, req proto.Message) (context.Context, context.CancelFunc, error) {
	if field, problem, found := invalidText(req.ProtoReflect()); found {
		return nil, nil, refused(field+": "+problem, &errdetails.ErrorInfo{Reason: "INVALID_REQUEST", Domain: Domain},
			&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{
				{Field: field, Description: problem},
			}})
	}
	ctx, err := c.withHeaders(ctx)
	if err != nil {
		return nil, nil, err
	}
	if _, ok := ctx.Deadline(); !ok && c.timeout > 0 && ctx.Value(noDeadlineKey{}) == nil {
		ctx, cancel := context.WithTimeout(ctx, c.timeout)
		return ctx, cancel, nil
	}
	ctx, cancel := context.WithCancel(ctx)
	return ctx, cancel, nil
}

// withHeaders is ctx with the client's headers less those whose key ctx's outgoing metadata already has: the call's
// value replaces the client's, as in the Python and TypeScript clients. Sending both would leave the choice to the
// reader (the gateway takes the first, other servers and proxies may take the last). Metadata of the call's own that
// gRPC cannot send is an InvalidArgument *Error naming the key, never showing the value (a key to the gateway, say,
// read from a file with its newline), as Dial refuses such a WithHeader; a key starting grpc- ("grpc-trace-bin") is
// the call's to send.
func (c *Client) withHeaders(ctx context.Context) (context.Context, error) {
	callMetadata, ok := metadata.FromOutgoingContext(ctx)
	if !ok {
		return metadata.AppendToOutgoingContext(ctx, *c.headers...), nil
	}
	for key, values := range callMetadata {
		if problem := headerKeyProblem(key); problem != "" {
			return nil, refused(fmt.Sprintf("the call's metadata key %q: %s", key, problem))
		}
		for _, value := range values {
			if !validHeaderValue(key, value) {
				return nil, refused(fmt.Sprintf(
					"the call's metadata %q: gRPC takes only printable ASCII text as a value (value not shown)", key))
			}
		}
	}
	own := *c.headers
	headers := make([]string, 0, len(own))
	for i := 0; i < len(own); i += 2 {
		if len(callMetadata.Get(own[i])) == 0 {
			headers = append(headers, own[i], own[i+1])
		}
	}
	// In place of ctx's own: FromOutgoingContext lower-cased the keys, but grpc-go checks the metadata as the caller
	// built it, and fails the call Internal for an upper-case key in a literal metadata.MD ({"X-Trace": ...}).
	return metadata.AppendToOutgoingContext(metadata.NewOutgoingContext(ctx, callMetadata), headers...), nil
}

// refused is the InvalidArgument *Error of a call the client does not send, with details as the gateway's (status.Code
// and status.FromError read it as they read the gateway's).
func refused(message string, details ...protoadapt.MessageV1) *Error {
	st := status.New(codes.InvalidArgument, message)
	if detailed, err := st.WithDetails(details...); err == nil { // it fails only for a detail that does not marshal
		st = detailed
	}
	return ParseError(st.Err())
}

// invalidText finds the first string set in m that is not UTF-8, which protobuf does not marshal (grpc-go failed the
// call Internal, "string field contains invalid UTF-8", naming no field): its field path, in the gateway's form
// ("messages[0].content", `parameters.fields["type"]` for a map's entry), and what is wrong with it, in the Python
// client's words, which show none of the text (a prompt may hold anything). Only the fields that can hold a string
// are read, and a path is built only for the string at fault.
func invalidText(m protoreflect.Message) (field, problem string, found bool) {
	fields := m.Descriptor().Fields()
	for i := 0; i < fields.Len(); i++ {
		fd := fields.Get(i)
		kind := fd.Kind() // a map's is its entry's, MessageKind
		if kind != protoreflect.StringKind && kind != protoreflect.MessageKind && kind != protoreflect.GroupKind {
			continue
		}
		if !m.Has(fd) {
			continue
		}
		name := string(fd.Name())
		switch value := m.Get(fd); {
		case fd.IsList():
			list := value.List()
			for j := 0; j < list.Len(); j++ {
				if at, problem, found := invalidValue(fd, list.Get(j)); found {
					return joinedPath(name+"["+strconv.Itoa(j)+"]", at), problem, true
				}
			}
		case fd.IsMap():
			if at, problem, found := invalidEntry(fd, value.Map()); found {
				return name + at, problem, true
			}
		default:
			if at, problem, found := invalidValue(fd, value); found {
				return joinedPath(name, at), problem, true
			}
		}
	}
	return "", "", false
}

// invalidValue is invalidText for one value of the field fd (the whole of a singular field, an item of a repeated one
// or of a map): a string to check, or a message to walk. Its path is the value's own, below fd.
func invalidValue(fd protoreflect.FieldDescriptor, value protoreflect.Value) (field, problem string, found bool) {
	switch fd.Kind() {
	case protoreflect.StringKind:
		if text := value.String(); !utf8.ValidString(text) {
			return "", notUTF8(text), true
		}
	case protoreflect.MessageKind, protoreflect.GroupKind:
		return invalidText(value.Message())
	}
	return "", "", false
}

// invalidEntry is invalidText for the entries of the map field fd: a key, when a string, then its value. Its path is
// the entry's own, below fd: "" for a key at fault (not to be shown), `["key"]` or `["key"].field` for a value.
func invalidEntry(fd protoreflect.FieldDescriptor, entries protoreflect.Map) (field, problem string, found bool) {
	entries.Range(func(key protoreflect.MapKey, value protoreflect.Value) bool {
		shownKey := key.String()
		if fd.MapKey().Kind() == protoreflect.StringKind {
			if !utf8.ValidString(shownKey) {
				field, problem, found = "", "has a key that is "+notUTF8(shownKey), true
				return false
			}
			shownKey = strconv.Quote(shownKey)
		}
		if at, valueProblem, valueFound := invalidValue(fd.MapValue(), value); valueFound {
			field, problem, found = joinedPath("["+shownKey+"]", at), valueProblem, true
		}
		return !found
	})
	return field, problem, found
}

// notUTF8 says what in text is not UTF-8, by its first such byte alone (never the text around it).
func notUTF8(text string) string {
	for i := 0; i < len(text); {
		r, size := utf8.DecodeRuneInString(text[i:])
		if r == utf8.RuneError && size == 1 {
			return fmt.Sprintf("not valid UTF-8 text (bytes that are not UTF-8, such as 0x%02x)", text[i])
		}
		i += size
	}
	return "not valid UTF-8 text"
}

// joinedPath is the field path of at (a path below head, or "" for head itself) from head's field.
func joinedPath(head, at string) string {
	if at == "" {
		return head
	}
	return head + "." + at
}

// requestIDTrailer carries a call's id in the gateway's log (the caller's own, when it sent a sane one).
const requestIDTrailer = "x-request-id"

// wrapError turns a call's error into an *Error, leaving nil and non-status errors as they are, with the request id
// from the call's trailer and, when ctx (the call's, the client's default deadline included) ended the call, the
// context error to unwrap to. Call it before the client cancels ctx. When the call could not reach the gateway
// (UNAVAILABLE without the gateway's ErrorInfo, and nothing came from it: reached says whether a message or the
// response headers did), the message also says what to try. Where the gateway closed a TLS connection without a word
// (closedWithoutAWord), as one with mutual TLS does to a client it does not take, what to give it: a client
// certificate, or one its client CA issued. Else, where Dial chose the transport security by itself, what Dial chose
// and how to choose otherwise: the usual cause is a gateway that speaks the other one. A gateway that went away
// mid-call (killed after some chunks of a stream), or that answered an earlier call, was reached, whatever its
// transport security: an answer that was an error too, whose status came from the gateway (its ErrorInfo, or its
// x-request-id trailer).
func (c *Client) wrapError(ctx context.Context, err error, trailer metadata.MD, reached bool) error {
	if reached {
		c.reached.Store(true)
	}
	e := ParseError(err)
	if e == nil {
		return err
	}
	ids := trailer.Get(requestIDTrailer)
	if len(ids) > 0 {
		e.RequestID = ids[0]
	}
	// The gateway sends an error that comes before any message (INVALID_ARGUMENT, UNAUTHENTICATED, a limit's
	// RESOURCE_EXHAUSTED) trailers-only, with no response headers, so reached is false for it; yet it answered. Else,
	// once the gateway went away (a restart), the next call's UNAVAILABLE blamed the transport security it had
	// answered over.
	if e.ErrorInfo.GetDomain() == Domain || len(ids) > 0 {
		c.reached.Store(true)
	}
	_, hasDeadline := ctx.Deadline()
	switch {
	case e.Code == codes.Canceled && errors.Is(ctx.Err(), context.Canceled):
		e.ctxErr = context.Canceled
	// Not ctx.Err(): the gateway answers DEADLINE_EXCEEDED a little before the deadline passes, so that its status
	// (with the attempts) arrives rather than grpc-go's bare one.
	case e.Code == codes.DeadlineExceeded && hasDeadline:
		e.ctxErr = context.DeadlineExceeded
	}
	if e.Code == codes.Unavailable && e.ErrorInfo == nil && !c.reached.Load() {
		// The certificate's first: the more specific, and TLS with the system's roots was right if the gateway got
		// as far as asking for a client certificate.
		hint := c.securityHint
		if c.certificateHint != "" && closedWithoutAWord(e.Message) {
			hint = c.certificateHint
		}
		if hint != "" {
			e.Message += " (" + hint + ")"
		}
	}
	return e
}

// closedWithoutAWord says whether grpc-go's message is that of a TLS connection the server closed without a word: the
// gateway (gRPC's core) sends no alert when it refuses a client certificate, none given or one its client CA did not
// issue, so grpc-go tells of the closed connection alone. Under TLS 1.3 the client's handshake is over before the
// gateway looks at its certificate: what fails is reading the gateway's HTTP/2 preface ("error reading server
// preface: EOF") or writing the client's ("write: broken pipe", bare from the flush of the preface); under TLS 1.2,
// the handshake ("authentication handshake failed: EOF"); a reset in place of the end where the close comes first.
// A failure the client can tell itself has words of its own, and no hint of client certificates: a server it does
// not trust ("x509: ..."), a plaintext gateway ("first record does not look like a TLS handshake"), no gateway
// ("connection refused").
func closedWithoutAWord(message string) bool {
	for _, head := range []string{"error reading server preface: ", "authentication handshake failed: "} {
		if _, after, ok := strings.Cut(message, head); ok &&
			(strings.HasPrefix(after, "EOF") || strings.Contains(after, "connection reset by peer")) {
			return true
		}
	}
	return strings.Contains(message, "write: broken pipe") || strings.Contains(message, "write: connection reset by peer")
}

// unary makes one unary call through rpc with the client's headers and default deadline, and returns its error as an
// *Error with the call's request id.
func unary[Req proto.Message, Resp any](ctx context.Context, c *Client,
	rpc func(context.Context, Req, ...grpc.CallOption) (Resp, error), req Req, opts []grpc.CallOption) (Resp, error) {
	ctx, cancel, err := c.callContext(ctx, req)
	if err != nil {
		var none Resp
		return none, err
	}
	defer cancel()
	var header, trailer metadata.MD
	// Clipped, so that append copies rather than writes into the caller's array. The header is nil unless the
	// gateway's response headers came (grpc-go sets a non-nil MD then, empty or not).
	resp, err := rpc(ctx, req, append(slices.Clip(opts), grpc.Header(&header), grpc.Trailer(&trailer))...)
	return resp, c.wrapError(ctx, err, trailer, header != nil)
}

// Complete asks for one assistant message.
func (c *Client) Complete(ctx context.Context, req *llmrelayv1.CompleteRequest, opts ...grpc.CallOption) (*llmrelayv1.CompleteResponse, error) {
	return unary(ctx, c, c.rpc.Complete, req, opts)
}

// Stream asks for one assistant message as a stream of deltas. Read it with Recv until io.EOF; the last message
// carries the finish reason and usage. Close a stream that you stop reading early, so the gateway stops too.
//
// With req.OnInterrupt = INTERRUPT_POLICY_RESTART, a message whose GetRestart() is not nil (and nothing else set)
// means the upstream's stream broke and the gateway starts the answer over on the next backend: discard every delta
// received before it. Under the default policy such a break ends the stream with ABORTED (STREAM_INTERRUPTED).
// Collect does all this and returns the whole answer.
func (c *Client) Stream(ctx context.Context, req *llmrelayv1.StreamCompleteRequest, opts ...grpc.CallOption) (*Stream, error) {
	ctx, cancel, err := c.callContext(ctx, req)
	if err != nil {
		return nil, err
	}
	s := &Stream{ctx: ctx, cancel: cancel, client: c}
	// grpc-go fills s.header when the call ends (before Recv returns its error): nil unless the response headers came.
	stream, err := c.rpc.StreamComplete(ctx, req, append(slices.Clip(opts), grpc.Header(&s.header))...)
	if err != nil {
		err = c.wrapError(ctx, err, nil, s.header != nil)
		cancel()
		return nil, err
	}
	s.stream = stream
	return s, nil
}

// CountTokens counts the tokens of a chat or a text for a model: offline, by the gateway's own tokenizers, or by the
// backend's where it counts them itself (llama.cpp, vLLM, Anthropic's count endpoint); the answer's Encoding says
// which.
func (c *Client) CountTokens(ctx context.Context, req *llmrelayv1.CountTokensRequest, opts ...grpc.CallOption) (*llmrelayv1.CountTokensResponse, error) {
	return unary(ctx, c, c.rpc.CountTokens, req, opts)
}

// Health reports the state of every backend (probe: check them now rather than report the last probe).
func (c *Client) Health(ctx context.Context, probe bool, opts ...grpc.CallOption) (*llmrelayv1.HealthResponse, error) {
	return unary(ctx, c, c.rpc.Health, &llmrelayv1.HealthRequest{Probe: probe}, opts)
}

// Embed turns texts into vectors, one per input in the order of req.Inputs (GetEmbeddings()[i].GetValues()), all from
// one embedding model: req.Model (or "backend/model"), else the gateway's default embedding model. The gateway may
// retry, or ask another backend serving the same model, but never another model.
func (c *Client) Embed(ctx context.Context, req *llmrelayv1.EmbedRequest, opts ...grpc.CallOption) (*llmrelayv1.EmbedResponse, error) {
	return unary(ctx, c, c.rpc.Embed, req, opts)
}

// GetUsage reads the usage ledger: token totals per backend, model and caller.
func (c *Client) GetUsage(ctx context.Context, req *llmrelayv1.GetUsageRequest, opts ...grpc.CallOption) (*llmrelayv1.GetUsageResponse, error) {
	return unary(ctx, c, c.rpc.GetUsage, req, opts)
}

// Stream is one streamed completion.
type Stream struct {
	stream grpc.ServerStreamingClient[llmrelayv1.StreamCompleteResponse]
	ctx    context.Context
	cancel context.CancelFunc
	client *Client
	header metadata.MD // the response headers, once the call has ended: nil when none came
	heard  bool        // whether a message came: the gateway was reached
}

// Recv returns the next message, io.EOF after the last one, or an *Error when the call failed.
func (s *Stream) Recv() (*llmrelayv1.StreamCompleteResponse, error) {
	msg, err := s.stream.Recv()
	if err != nil {
		// io.EOF carries no status, so wrapError returns it as it is. The trailer is there once Recv has failed.
		err = s.client.wrapError(s.ctx, err, s.stream.Trailer(), s.heard || s.header != nil)
		s.cancel()
		return nil, err
	}
	s.heard = true
	return msg, nil
}

// Header is the response metadata the gateway sent before the first message.
func (s *Stream) Header() (metadata.MD, error) {
	return s.stream.Header()
}

// Close ends the call; the gateway stops asking the upstream for more. Safe to call more than once.
func (s *Stream) Close() {
	s.cancel()
}

// System is a system message: instructions that frame the conversation.
func System(content string) *llmrelayv1.Message {
	return &llmrelayv1.Message{Role: llmrelayv1.Role_ROLE_SYSTEM, Content: content}
}

// User is a user message.
func User(content string) *llmrelayv1.Message {
	return &llmrelayv1.Message{Role: llmrelayv1.Role_ROLE_USER, Content: content}
}

// Assistant is an assistant message, for earlier turns of the chat.
func Assistant(content string) *llmrelayv1.Message {
	return &llmrelayv1.Message{Role: llmrelayv1.Role_ROLE_ASSISTANT, Content: content}
}

// validHeaderValue: a value gRPC sends for key: any bytes for a key ending -bin, else printable ASCII (spaces too).
func validHeaderValue(key, value string) bool {
	if strings.HasSuffix(strings.ToLower(key), "-bin") {
		return true
	}
	for i := 0; i < len(value); i++ {
		if value[i] < ' ' || value[i] > '~' {
			return false
		}
	}
	return true
}

// connectionHeaders are the HTTP/1 connection-specific keys, which HTTP/2, and so gRPC, does not carry (RFC 9113
// 8.2.2; HTTP2-Settings belongs to HTTP/1's upgrade to HTTP/2), as the TypeScript SDK lists them. grpc-go sends them
// all the same, and a conforming HTTP/2 hop (Go's net/http, Envoy) refused every call with one of RFC 9113's, which
// the caller saw fail Internal as though the gateway had (a grpc-go server resets the stream).
var connectionHeaders = []string{"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
	"http2-settings"}

// headerKeyProblem says why gRPC cannot send the metadata key (in any case) as the caller means it, in words that fit
// after the key; "" when it can. Keys starting grpc- are not its business: a call's own may send one (a trace's
// context, grpc-trace-bin), Dial refuses them itself.
func headerKeyProblem(key string) string {
	key = strings.ToLower(key)
	switch {
	// Else every call fails Internal, "header key ... contains illegal characters", as though the gateway had.
	case !sendableHeaderKey(key):
		return "gRPC takes only letters, digits, '-', '_' and '.' in a key"
	case slices.Contains(connectionHeaders, key):
		return "HTTP/2, which gRPC runs on, cannot send a connection-specific header (" +
			strings.Join(connectionHeaders, ", ") + ")"
	// grpc-go drops these for its own, without a word: the caller's never arrives.
	case key == "user-agent":
		return "keys te, content-type and user-agent are gRPC's own; " +
			"set the user agent with llmrelay.WithDialOptions(grpc.WithUserAgent(...))"
	case key == "te" || key == "content-type":
		return "keys te, content-type and user-agent are gRPC's own"
	}
	return ""
}

// sendableHeaderKey: a metadata key gRPC sends once lower-cased. Upper-case letters are taken: grpc-go takes only
// lower case, but WithHeader, metadata.Pairs and AppendToOutgoingContext lower-case the key, and withHeaders a
// literal metadata.MD's.
func sendableHeaderKey(key string) bool {
	if key == "" {
		return false
	}
	for _, c := range strings.ToLower(key) {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}
