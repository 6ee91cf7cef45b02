package llmrelay_test

import (
	"testing"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/llmrelay/llmrelay/client/go/llmrelay"
	llmrelayv1 "github.com/llmrelay/llmrelay/client/go/llmrelay/v1"
)

// A status with two details of a type (one added by a proxy on the way, say) is read by its first of each, as the
// Python and TypeScript SDKs read it.
func TestParseErrorTakesTheFirstDetailOfEachType(t *testing.T) {
	st, err := status.New(codes.Unavailable, "overloaded").WithDetails(
		&errdetails.ErrorInfo{Reason: "UPSTREAM_UNAVAILABLE", Domain: llmrelay.Domain},
		&errdetails.RetryInfo{RetryDelay: durationpb.New(2e9)},
		&llmrelayv1.AttemptHistory{Attempts: []*llmrelayv1.Attempt{{Backend: "first"}}},
		&errdetails.ErrorInfo{Reason: "OVERLOADED", Domain: llmrelay.Domain},
		&errdetails.RetryInfo{RetryDelay: durationpb.New(9e9)},
		&llmrelayv1.AttemptHistory{Attempts: []*llmrelayv1.Attempt{{Backend: "second"}}},
	)
	if err != nil {
		t.Fatal(err)
	}
	parsed := llmrelay.ParseError(st.Err())
	if parsed == nil {
		t.Fatal("ParseError of a gRPC status gave nil")
	}
	if got := parsed.Reason(); got != "UPSTREAM_UNAVAILABLE" {
		t.Errorf("Reason() = %q; want the first ErrorInfo's, UPSTREAM_UNAVAILABLE", got)
	}
	if got := parsed.RetryInfo.GetRetryDelay().AsDuration().Seconds(); got != 2 {
		t.Errorf("RetryInfo's delay = %vs; want the first's, 2s", got)
	}
	if len(parsed.Attempts) != 1 || parsed.Attempts[0].GetBackend() != "first" {
		t.Errorf("Attempts = %v; want the first AttemptHistory's", parsed.Attempts)
	}
}
