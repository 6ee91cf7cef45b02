/**
 * Streams one completion from an llmrelay gateway and prints the tokens as they come, starting over when a
 * backend's stream breaks midway.
 *
 *   npx tsc -p . && node build/examples/complete.js "Why is the sky blue?"
 *
 * In your own project, import from "@llmrelay/client" instead of "../src".
 */
import { Client, LLMRelayError, user } from "../src";

async function main(): Promise<void> {
  const target = process.env.LLMRELAY_TARGET ?? "127.0.0.1:50051";
  const prompt = process.argv.slice(2).join(" ") || "Say hello in five words.";
  const client = new Client(target, { caller: "example-node" }); // plaintext to loopback, TLS to any other host
  try {
    // collect() prints the pieces as they come and resolves to the whole answer; if a backend's stream breaks
    // midway, the gateway starts over on the next backend (onRestart), and the answer is that backend's alone.
    const answer = await client.collect(
      { messages: [user(prompt)] },
      {
        timeoutMs: 60_000,
        onDelta: (chunk) => process.stdout.write(chunk.delta?.content ?? ""),
        onRestart: (restart) => console.log(`\n[${restart.backend} broke off: ${restart.reason}; starting over]`),
      },
    );
    process.stdout.write(`\n[${answer.model} via ${answer.backend}: ${answer.usage?.totalTokens ?? 0} tokens]\n`);
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
