/**
 * A small agent with two tools: the model may ask for the weather and the local time of a city; the loop runs the
 * tools it asks for (at once when it asks for several), hands back their results, and prints the answer as it comes.
 *
 *   npx tsc -p . && node build/examples/agent.js "Should I take an umbrella in Lisbon, and is it lunch time there?"
 *
 * Against `make demo`'s gateway (127.0.0.1:50051, a tiny random model) the model will likely answer without calling
 * a tool: the program still runs to the end. In your own project, import from "@llmrelay/client" instead of "../src".
 */
import { Agent, Client, Conversation, LLMRelayError, StepLimitError, s, system, tool, user } from "../src";

/** Made-up weather: a real agent would call a weather service here (and pass on `signal`). */
const getWeather = tool({
  name: "get_weather",
  description: "The weather in a city now: the sky and the temperature in degrees Celsius",
  parameters: s.object({ city: s.string().describe("The city, in English, e.g. Lisbon") }),
  run: ({ city }) => ({ city, sky: city.length % 2 === 0 ? "clear" : "rain", celsius: 12 + (city.length % 15) }),
});

const getTime = tool({
  name: "get_time",
  description: "The local time in an IANA time zone",
  parameters: s.object({ timeZone: s.string().describe("An IANA time zone, e.g. Europe/Lisbon") }),
  // An unknown zone throws a RangeError: the loop hands it to the model as the tool's result, and goes on.
  run: ({ timeZone }) => new Date().toLocaleTimeString("en-GB", { timeZone, hour: "2-digit", minute: "2-digit" }),
});

async function main(): Promise<void> {
  const target = process.env.LLMRELAY_TARGET ?? "127.0.0.1:50051";
  const question = process.argv.slice(2).join(" ") || "Should I take an umbrella in Lisbon, and is it lunch time?";
  const client = new Client(target, { caller: "example-node-agent" }); // plaintext to loopback, TLS to any other
  const controller = new AbortController();
  process.once("SIGINT", () => controller.abort(new Error("interrupted")));
  // The budget keeps a long chat within a small model's context: the oldest turns go first.
  const conversation = new Conversation(
    [system("You answer briefly. Use the tools for the weather and the time."), user(question)],
    { budgetTokens: 2_000 },
  );
  try {
    const agent = new Agent(client, { tools: [getWeather, getTime], maxSteps: 5, options: { maxTokens: 200 } });
    const result = await agent.run(conversation, {
      timeoutMs: 60_000,
      signal: controller.signal,
      onDelta: (chunk) => process.stdout.write(chunk.delta?.content ?? ""),
      onStep: (_, toolMessages) => {
        for (const message of toolMessages) {
          process.stdout.write(`\n[tool ${message.name}: ${message.content}]\n`);
        }
      },
    });
    const { steps, usage } = result;
    process.stdout.write(`\n[${steps} step(s), ${usage.totalTokens} tokens, via ${result.answer.backend}]\n`);
  } catch (err) {
    if (err instanceof StepLimitError) {
      console.error(`\n${err.message}`);
    } else if (err instanceof LLMRelayError) {
      console.error(`\nerror: ${err.message}`);
    } else {
      throw err;
    }
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

void main();
