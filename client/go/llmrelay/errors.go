package llmrelay

import (
	"cmp"
	"errors"
	"fmt"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	llmrelayv1 "github.com/llmrelay/llmrelay/client/go/llmrelay/v1"
)

// Domain is the ErrorInfo domain of the gateway's own errors.
const Domain = "llmrelay.dev"

// Error is a failed call: its gRPC status, with the google.rpc details the gateway attached decoded.
//
//	var e *llmrelay.Error
//	if errors.As(err, &e) && e.Reason() == "UPSTREAM_RATE_LIMITED" {
//		delay, _ := e.RetryDelay()
//		time.Sleep(delay)
//	}
type Error struct {
	// Code is the gRPC status code.
	Code codes.Code
	// Message is the status message, for people.
	Message string
	// ErrorInfo says why the call failed (Reason is one of llmrelay.v1's ErrorReason names); nil when absent.
	ErrorInfo *errdetails.ErrorInfo
	// RetryInfo says when a retry can help; nil when a retry cannot help.
	RetryInfo *errdetails.RetryInfo
	// BadRequest names the invalid fields of the request; nil unless the request was invalid.
	BadRequest *errdetails.BadRequest
	// QuotaFailure names the limit the call ran into (every <LIMIT>_EXCEEDED reason): whose ("key:NAME" or
	// "gateway") and which; for a request that alone is larger than the limit, also what to change in it. Nil when
	// absent.
	QuotaFailure *errdetails.QuotaFailure
	// Attempts are what the gateway tried before it gave up (its AttemptHistory detail): each backend, model and
	// outcome, in order; nil for a call that failed before the router (an invalid request, say).
	Attempts []*llmrelayv1.Attempt
	// RequestID is the call's id in the gateway's log (its x-request-id trailer), to quote to whoever runs the
	// gateway; "" when no gateway answered, and on an *Error that ParseError made (it sees no trailers).
	RequestID string

	status *status.Status
	// ctxErr is context.Canceled or context.DeadlineExceeded when the call's context ended the call (Unwrap).
	ctxErr error
}

// ParseError reads err's gRPC status and its details. It returns nil when err is nil or carries no gRPC status
// (the errors of this package's calls always do; so do those of the generated stubs). A wrapped error is unwrapped:
// an *Error it wraps comes back as it is, and Message is the status's own message, not the text of the wrappers
// (fmt.Errorf's, or grpc-go's "max retries exhausted: ..." around the last attempt's status).
func ParseError(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	// Not status.FromError: for a wrapped status, its message is err.Error(), the whole chain.
	var carrier interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &carrier) || carrier.GRPCStatus() == nil {
		return nil
	}
	st := carrier.GRPCStatus()
	e = &Error{Code: st.Code(), Message: st.Message(), status: st}
	// The first detail of each type, as the Python and TypeScript SDKs read them, where a status carries two (one
	// added by a proxy, say).
	var history *llmrelayv1.AttemptHistory
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			e.ErrorInfo = cmp.Or(e.ErrorInfo, d)
		case *errdetails.RetryInfo:
			e.RetryInfo = cmp.Or(e.RetryInfo, d)
		case *errdetails.BadRequest:
			e.BadRequest = cmp.Or(e.BadRequest, d)
		case *errdetails.QuotaFailure:
			e.QuotaFailure = cmp.Or(e.QuotaFailure, d)
		case *llmrelayv1.AttemptHistory:
			history = cmp.Or(history, d)
		}
	}
	e.Attempts = history.GetAttempts()
	return e
}

// Error describes the failure as "CODE (REASON): message".
func (e *Error) Error() string {
	if reason := e.Reason(); reason != "" {
		return fmt.Sprintf("llmrelay: %s (%s): %s", e.Code, reason, e.Message)
	}
	return fmt.Sprintf("llmrelay: %s: %s", e.Code, e.Message)
}

// GRPCStatus lets status.FromError and status.Code read the original status.
func (e *Error) GRPCStatus() *status.Status {
	return e.status
}

// Unwrap is the context error that ended the call, so that errors.Is finds it: context.Canceled for a call whose
// context was cancelled, context.DeadlineExceeded for one that ran out of its deadline (its context's, or the
// client's default). Nil for any other failure, Client.Close's CANCELED among them, and on an *Error that ParseError
// made (it sees no context).
func (e *Error) Unwrap() error {
	return e.ctxErr
}

// Reason is the ErrorInfo reason, such as "UPSTREAM_RATE_LIMITED"; "" without ErrorInfo from the gateway.
func (e *Error) Reason() string {
	if e.ErrorInfo == nil || e.ErrorInfo.GetDomain() != Domain {
		return ""
	}
	return e.ErrorInfo.GetReason()
}

// ErrorReason is Reason as the contract's enum (ERROR_REASON_UNSPECIFIED when absent or unknown to this version).
func (e *Error) ErrorReason() llmrelayv1.ErrorReason {
	return llmrelayv1.ErrorReason(llmrelayv1.ErrorReason_value["ERROR_REASON_"+e.Reason()])
}

// Metadata is the ErrorInfo metadata (what was tried, the upstream's status, ...); nil without ErrorInfo.
func (e *Error) Metadata() map[string]string {
	return e.ErrorInfo.GetMetadata()
}

// RetryDelay is how long to wait before a retry, and whether the gateway said that a retry can help at all.
func (e *Error) RetryDelay() (time.Duration, bool) {
	if e.RetryInfo == nil {
		return 0, false
	}
	return e.RetryInfo.GetRetryDelay().AsDuration(), true
}

// FieldViolations lists the invalid fields of the request, by field path ("messages", "options.temperature").
func (e *Error) FieldViolations() []*errdetails.BadRequest_FieldViolation {
	return e.BadRequest.GetFieldViolations()
}

// QuotaViolations lists the limits the call ran into: Subject is whose limit ("key:NAME", "gateway"), Description
// which limit, and for a request that never fits what to change ("set max_tokens to at most N").
func (e *Error) QuotaViolations() []*errdetails.QuotaFailure_Violation {
	return e.QuotaFailure.GetViolations()
}
