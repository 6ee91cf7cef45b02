package llmrelay

import (
	"context"
	"fmt"

	llmrelayv1 "github.com/llmrelay/llmrelay/client/go/llmrelay/v1"
)

// Conversation holds the messages of a chat, for the next request, and keeps them within a token budget: Fit drops
// the oldest turns (a user message and every message up to the next user message: the answers, tool calls and their
// results together) until the chat, counted by the gateway's CountTokens, fits. System messages are never dropped,
// nor the last turn. Agent.Run appends each answer and tool result to it, and fits it before each step. It is not
// safe for concurrent use.
type Conversation struct {
	// Messages is the chat so far, oldest first.
	Messages []*llmrelayv1.Message
	// TokenBudget, when above 0, is how many prompt tokens the chat may take (the model's context window less the
	// room the answer needs). 0 is no budget: nothing is dropped (where the Python and TypeScript SDKs' 0 is a budget
	// of 0 tokens, and no budget is None or undefined). Below 0 is refused: Fit, FitFor and Run return an error.
	TokenBudget int
	// Model is the model whose tokenizer counts: the model the requests name. "" for the model of the Agent that
	// runs it (Agent.Model), else the gateway's default chain.
	Model string
}

// NewConversation is a conversation that starts with the messages (System, User, ...).
func NewConversation(messages ...*llmrelayv1.Message) *Conversation {
	return &Conversation{Messages: messages}
}

// Add appends messages: the user's next one, an answer (resp.GetMessage()), tool results.
func (c *Conversation) Add(messages ...*llmrelayv1.Message) {
	c.Messages = append(c.Messages, messages...)
}

// CountTokens counts the chat's prompt tokens for c.Model through the gateway (CountTokens), with the definitions of
// the tools the request will offer, which count too.
func (c *Conversation) CountTokens(ctx context.Context, client *Client, tools ...*llmrelayv1.Tool) (int, error) {
	return c.countTokens(ctx, client, c.Messages, "", tools, nil)
}

// CountTokensFor counts as CountTokens does, for a request with these options: the definitions of its tools and the
// schema of its answer format (a JSON schema goes into the prompt) count too.
func (c *Conversation) CountTokensFor(ctx context.Context, client *Client, options *llmrelayv1.CompletionOptions) (int,
	error) {
	return c.countTokens(ctx, client, c.Messages, "", options.GetTools(), options.GetResponseFormat())
}

// countTokens counts messages (c.Messages, or what fit would leave of them) as CountTokens does, for c.Model or, when
// it names none, for model: the model the requests name (an Agent's), whose tokenizer the budget is of; with the
// answer format the requests ask for, whose schema counts too (nil: none).
func (c *Conversation) countTokens(ctx context.Context, client *Client, messages []*llmrelayv1.Message, model string,
	tools []*llmrelayv1.Tool, format *llmrelayv1.ResponseFormat) (int, error) {
	if c.Model != "" {
		model = c.Model
	}
	req := &llmrelayv1.CountTokensRequest{Messages: messages, Tools: tools, ResponseFormat: format}
	if model != "" {
		req.Model = &model
	}
	resp, err := client.CountTokens(ctx, req)
	if err != nil {
		return 0, err
	}
	return int(resp.GetTokenCount()), nil
}

// BudgetError is a conversation that does not fit its token budget even with only its system messages and last turn.
type BudgetError struct {
	// Tokens is what the chat takes with nothing more to drop; Budget is Conversation.TokenBudget.
	Tokens, Budget int
}

func (e *BudgetError) Error() string {
	return fmt.Sprintf("llmrelay: the conversation takes %d tokens with only its system messages and last turn, over "+
		"its budget of %d: shorten them, or raise Conversation.TokenBudget if the model's context window allows", e.Tokens,
		e.Budget)
}

// Fit drops the oldest turns until the chat (with the tools' definitions) takes at most TokenBudget tokens, and
// returns how many messages it dropped; a *BudgetError when even the system messages and the last turn take more.
// On an error the messages are left as they were.
// Without a budget (TokenBudget 0) it does nothing; a TokenBudget below 0 is an error.
func (c *Conversation) Fit(ctx context.Context, client *Client, tools ...*llmrelayv1.Tool) (int, error) {
	return c.fit(ctx, client, "", tools, nil)
}

// FitFor fits as Fit does, for a request with these options: its tools' definitions and its answer format's schema
// count too (CountTokensFor).
func (c *Conversation) FitFor(ctx context.Context, client *Client, options *llmrelayv1.CompletionOptions) (int, error) {
	return c.fit(ctx, client, "", options.GetTools(), options.GetResponseFormat())
}

// fit fits as Fit does, counting for c.Model or, when it names none, for model, with the answer format (countTokens).
func (c *Conversation) fit(ctx context.Context, client *Client, model string, tools []*llmrelayv1.Tool,
	format *llmrelayv1.ResponseFormat) (int, error) {
	if c.TokenBudget < 0 {
		// A context window less an answer's room gone below 0: taken as no budget, it would let the chat outgrow the
		// window unnoticed; refused, as the Python and TypeScript SDKs refuse it.
		return 0, fmt.Errorf("llmrelay: Conversation.TokenBudget must be 0 or more, not %d", c.TokenBudget)
	}
	if c.TokenBudget == 0 {
		return 0, nil
	}
	// Fitted on a copy, kept only when it fits: the turns dropped before an error (a BudgetError, a failed count)
	// would be lost to a caller who then raises the budget or shortens the last turn.
	messages := c.Messages
	for {
		tokens, err := c.countTokens(ctx, client, messages, model, tools, format)
		if err != nil {
			return 0, err
		}
		if tokens <= c.TokenBudget {
			dropped := len(c.Messages) - len(messages)
			c.Messages = messages
			return dropped, nil
		}
		oldest := oldestTurn(messages)
		if oldest == nil {
			return 0, &BudgetError{Tokens: tokens, Budget: c.TokenBudget}
		}
		kept := make([]*llmrelayv1.Message, 0, len(messages))
		for i, message := range messages {
			if !oldest[i] {
				kept = append(kept, message)
			}
		}
		messages = kept
	}
}

// oldestTurn is the positions of the first turn's messages (the non-system messages before the second user message
// among them), or nil when there is only one turn: the last is never dropped.
func oldestTurn(messages []*llmrelayv1.Message) map[int]bool {
	turn := map[int]bool{}
	for i, message := range messages {
		if message.GetRole() == llmrelayv1.Role_ROLE_SYSTEM {
			continue
		}
		if message.GetRole() == llmrelayv1.Role_ROLE_USER && len(turn) > 0 {
			return turn
		}
		turn[i] = true
	}
	return nil
}
