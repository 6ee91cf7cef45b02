// Command complete streams one completion from an llmrelay gateway and prints the tokens as they come; when an
// upstream's stream breaks midway, the gateway starts the answer over on the next backend and the program says so.
//
//	go run ./examples/complete -target 127.0.0.1:50051 "Why is the sky blue?"
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"strings"
	"time"

	"github.com/llmrelay/llmrelay/client/go/llmrelay"
	llmrelayv1 "github.com/llmrelay/llmrelay/client/go/llmrelay/v1"
)

func main() {
	target := flag.String("target", "127.0.0.1:50051",
		"the gateway's host:port (plaintext to a loopback target, TLS otherwise)")
	model := flag.String("model", "", "the model (empty: the gateway's default chain)")
	timeout := flag.Duration("timeout", 60*time.Second, "deadline of the whole call")
	flag.Parse()
	prompt := strings.Join(flag.Args(), " ")
	if prompt == "" {
		prompt = "Say hello in five words."
	}

	client, err := llmrelay.Dial(*target, llmrelay.WithCaller("example-go")) // plaintext to loopback, TLS otherwise
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	req := &llmrelayv1.StreamCompleteRequest{Messages: []*llmrelayv1.Message{llmrelay.User(prompt)}}
	if *model != "" {
		req.Model = model
	}
	// Collect asks the gateway to start over on the next backend if a stream breaks midway (a restart marker), and
	// returns the whole answer; the callback prints the tokens as they come.
	answer, err := client.Collect(ctx, req, func(chunk *llmrelayv1.StreamCompleteResponse) {
		if restart := chunk.GetRestart(); restart != nil {
			fmt.Printf("\n[%s broke off (%s); starting over]\n", restart.GetBackend(), restart.GetReason())
		}
		fmt.Print(chunk.GetDelta().GetContent())
	})
	if err != nil {
		fail(err)
	}
	fmt.Printf("\n[%s via %s: %d tokens, %s]\n", answer.GetModel(), answer.GetBackend(),
		answer.GetUsage().GetTotalTokens(), answer.GetFinishReason())
}

// fail prints what the gateway said: the reason, and when a retry can help.
func fail(err error) {
	if e := llmrelay.ParseError(err); e != nil {
		fmt.Fprintf(os.Stderr, "\nerror: %s", e.Code)
		if e.Reason() != "" {
			fmt.Fprintf(os.Stderr, " %s", e.Reason())
		}
		if delay, ok := e.RetryDelay(); ok {
			fmt.Fprintf(os.Stderr, " (retry in %s)", delay)
		}
		for _, v := range e.FieldViolations() {
			fmt.Fprintf(os.Stderr, "\n  %s: %s", v.GetField(), v.GetDescription())
		}
		fmt.Fprintf(os.Stderr, ": %s\n", e.Message)
	} else {
		fmt.Fprintf(os.Stderr, "\nerror: %v\n", err)
	}
	os.Exit(1)
}
