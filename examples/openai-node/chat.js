// An OpenAI app, unchanged, asking a VFMOS FM process through vfm-gatewayd.
// usage: node chat.js BASE_URL API_KEY MODEL QUESTION   (BASE_URL like http://127.0.0.1:8080/v1)
// Prints one JSON line: the answer, its finish reason and usage, then the streamed answer.
const OpenAI = require("openai");

async function main() {
  const [baseURL, apiKey, model, question] = process.argv.slice(2);
  const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
  const messages = [{ role: "user", content: question }];
  const reply = await client.chat.completions.create({ model, messages, max_tokens: 12 });
  const stream = await client.chat.completions.create({
    model, messages, max_tokens: 12, stream: true, stream_options: { include_usage: true },
  });
  let streamed = "", usage = null;
  for await (const chunk of stream) {
    if (chunk.choices.length) streamed += chunk.choices[0].delta.content || "";
    if (chunk.usage) usage = chunk.usage;
  }
  console.log(JSON.stringify({ answer: reply.choices[0].message.content,
    finish_reason: reply.choices[0].finish_reason, usage: reply.usage, streamed,
    streamed_usage: usage }));
}

main().catch((err) => {
  console.error(`${err.status || ""} ${err.message}`);
  process.exit(1);
});
