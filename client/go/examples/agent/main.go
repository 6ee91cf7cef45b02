// Command agent is a small agent with two tools, a clock and a calculator: it asks an llmrelay gateway, runs the tools
// the model calls (both at once when it calls both), hands back their results, and prints the answer as it comes.
//
//	go run ./examples/agent -target 127.0.0.1:50051 "What time is it in Tokyo, and what is 17 times 23?"
//
// Against `make demo`'s gateway (a tiny model with random weights) the model answers at once in random words, without
// calling a tool: the program prints that answer and ends as cleanly.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"strings"
	"time"

	"github.com/llmrelay/llmrelay/client/go/llmrelay"
	llmrelayv1 "github.com/llmrelay/llmrelay/client/go/llmrelay/v1"
)

// clockArgs are the clock tool's arguments; their JSON Schema, which the model gets, is read from the tags.
type clockArgs struct {
	Zone string `json:"zone" description:"An IANA time zone, such as Asia/Tokyo or Europe/Paris"`
}

// calculateArgs are the calculator's arguments.
type calculateArgs struct {
	Operation string  `json:"operation" enum:"add,subtract,multiply,divide"`
	A         float64 `json:"a"`
	B         float64 `json:"b"`
}

// clock tells the time in a zone.
func clock(_ context.Context, args clockArgs) (string, error) {
	zone, err := time.LoadLocation(args.Zone)
	if err != nil {
		return "", err // the model reads "error: ...", and may try another zone
	}
	return time.Now().In(zone).Format("Monday 15:04 MST"), nil
}

// calculate does one arithmetic operation.
func calculate(_ context.Context, args calculateArgs) (float64, error) {
	switch args.Operation {
	case "add":
		return args.A + args.B, nil
	case "subtract":
		return args.A - args.B, nil
	case "multiply":
		return args.A * args.B, nil
	case "divide":
		if args.B == 0 {
			return 0, errors.New("division by zero")
		}
		return args.A / args.B, nil
	}
	return 0, fmt.Errorf("unknown operation %q", args.Operation)
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "the gateway (plaintext to a loopback target, TLS otherwise)")
	model := flag.String("model", "", "the model (empty: the gateway's default chain)")
	maxTokens := flag.Int("max-tokens", 200, "the most tokens of each answer")
	budget := flag.Int("budget", 4000, "the most prompt tokens of the conversation (older turns are dropped)")
	timeout := flag.Duration("timeout", 2*time.Minute, "deadline of the whole run")
	flag.Parse()
	question := strings.Join(flag.Args(), " ")
	if question == "" {
		question = "What time is it in Tokyo, and what is 17 times 23?"
	}

	clockTool, err := llmrelay.NewTool("clock", "The current time in a time zone", clock)
	if err != nil {
		log.Fatal(err)
	}
	calculatorTool, err := llmrelay.NewTool("calculate", "One arithmetic operation on two numbers", calculate)
	if err != nil {
		log.Fatal(err)
	}
	client, err := llmrelay.Dial(*target, llmrelay.WithCaller("example-go-agent"))
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()

	maxTokensOption := int32(*maxTokens)
	agent := &llmrelay.Agent{
		Client:  client,
		Tools:   []llmrelay.Tool{clockTool, calculatorTool},
		Model:   *model,
		Options: &llmrelayv1.CompletionOptions{MaxTokens: &maxTokensOption},
		OnChunk: llmrelay.PrintTo(os.Stdout),
		OnToolResult: func(call *llmrelayv1.ToolCall, result *llmrelayv1.Message) {
			fmt.Printf("\n[%s(%s) -> %s]\n", call.GetFunction().GetName(), call.GetFunction().GetArguments(),
				result.GetContent())
		},
	}
	conversation := llmrelay.NewConversation(
		llmrelay.System("You answer briefly. Use the tools for the time and for arithmetic."),
		llmrelay.User(question),
	)
	conversation.TokenBudget, conversation.Model = *budget, *model

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	result, err := agent.Run(ctx, conversation)
	if err != nil {
		fmt.Fprintf(os.Stderr, "\nerror: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("\n[%s via %s: steps %d, tokens %d, %s]\n", result.Answer.GetModel(), result.Answer.GetBackend(),
		result.Steps, result.Usage.GetTotalTokens(), result.Answer.GetFinishReason())
}
