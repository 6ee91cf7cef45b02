/**
 * Streams one completion from an llmrelay gateway and prints the tokens as they come.
 *
 *   npm run build && node dist/examples/complete.js "Why is the sky blue?"
 *
 * In your own project, import from "@llmrelay/client" instead of "../src".
 */
import { Client, LLMRelayError, user } from "../src";

async function main(): Promise<void> {
  const target = process.env.LLMRELAY_TARGET ?? "127.0.0.1:50051";
  const prompt = process.argv.slice(2).join(" ") || "Say hello in five words.";
  const client = new Client(target, { insecure: true, caller: "example-node" });
  try {
    for await (const chunk of client.stream({ messages: [user(prompt)] }, { timeoutMs: 60_000 })) {
      process.stdout.write(chunk.delta?.content ?? "");
      if (chunk.usage) {
        process.stdout.write(`\n[${chunk.model} via ${chunk.backend}: ${chunk.usage.totalTokens} tokens]\n`);
      }
    }
  } catch (err) {
    if (err instanceof LLMRelayError) {
      // What the gateway said: the reason, and when a retry can help.
      const retry = err.retryDelayMs === undefined ? "" : ` (retry in ${err.retryDelayMs} ms)`;
      const reason = err.reason ? ` ${err.reason}` : "";
      console.error(`\nerror: ${err.codeName}${reason}${retry}: ${err.details}`);
      for (const v of err.fieldViolations) {
        console.error(`  ${v.field}: ${v.description}`);
      }
      process.exitCode = 1;
    } else {
      throw err;
    }
  } finally {
    client.close();
  }
}

void main();
