#!/usr/bin/env node
'use strict';
// Stream a completion to stdout:
//   BATON_TARGET=127.0.0.1:50051 node example.js [--max-new-tokens N] [--chat] [--logprobs N]
//                                                [--request-id ID] PROMPT...
// The finish reason and token usage go to stderr. Ctrl-C cancels the request.
// The request id (given, or a random UUID) is sent in the body and as the x-baton-request-id
// routing header, so `baton preempt ID ...` through a load balancer reaches this request.
// --logprobs N: after the text, one line per generated token with its log-probability and the N
// most likely alternatives (0..20; 0 = the chosen token's only).
const { randomUUID } = require('node:crypto');
const { BatonClient, statusName } = require('./client');

function parseArgs(argv) {
  const opts = { maxNewTokens: 0, chat: false, logprobs: null, requestId: '', words: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--max-new-tokens' || a === '-n') opts.maxNewTokens = Number(argv[++i]);
    else if (a.startsWith('--max-new-tokens=')) opts.maxNewTokens = Number(a.split('=')[1]);
    else if (a === '--logprobs') opts.logprobs = Number(argv[++i]);
    else if (a === '--request-id') opts.requestId = String(argv[++i] || '');
    else if (a === '--chat') opts.chat = true;
    else if (a === '-h' || a === '--help') opts.help = true;
    else opts.words.push(a);
  }
  return opts;
}

function badLogprobs(n) {
  return n !== null && !(Number.isInteger(n) && n >= 0 && n <= 20);
}

// One line per token: the message's text (on its first token), id, logprob, top alternatives id:logprob.
function printLogprobs(messages) {
  process.stdout.write('[log-probabilities: text, token id, logprob, top alternatives id:logprob]\n');
  for (const msg of messages) {
    msg.logprobs.forEach((lp, i) => {
      const text = i === 0 ? JSON.stringify(msg.text) : '';
      const top = lp.top.map((t) => `${t.token_id}:${t.logprob.toFixed(4)}`).join('  ');
      process.stdout.write(`${text.padStart(16)} ${String(lp.token_id).padStart(7)} `
        + `${lp.logprob.toFixed(4).padStart(9)}  ${top}`.trimEnd() + '\n');
    });
  }
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const prompt = opts.words.join(' ');
  if (opts.help || !prompt || !Number.isInteger(opts.maxNewTokens) || opts.maxNewTokens < 0
      || badLogprobs(opts.logprobs)) {
    process.stderr.write('usage: node example.js [--max-new-tokens N] [--chat] [--logprobs N] [--request-id ID] PROMPT...\n'
      + '  target: BATON_TARGET (default 127.0.0.1:50051); --logprobs N: 0..20 alternatives\n');
    return 2;
  }
  const client = new BatonClient(process.env.BATON_TARGET);
  const request = opts.chat ? { messages: [{ role: 'user', content: prompt }] } : { prompt };
  request.request_id = opts.requestId || randomUUID();
  request.params = { max_new_tokens: opts.maxNewTokens };
  if (opts.logprobs !== null) Object.assign(request.params, { logprobs: true, top_logprobs: opts.logprobs });
  const call = client.generate(request);
  process.on('SIGINT', () => call.cancel());
  const messages = [];
  try {
    for await (const msg of call) {
      messages.push(msg);
      if (msg.text) process.stdout.write(msg.text);
      if (msg.finish_reason !== 'FINISH_REASON_UNSPECIFIED') {
        const u = msg.usage || {};
        process.stdout.write('\n');
        if (opts.logprobs !== null) printLogprobs(messages);
        process.stderr.write(`[${msg.request_id}] finish_reason=${msg.finish_reason} `
          + `prompt_tokens=${u.prompt_tokens} completion_tokens=${u.completion_tokens}\n`);
      }
    }
    return 0;
  } catch (err) {
    process.stderr.write(`\nerror: ${statusName(err.code)}: ${err.details || err.message}\n`);
    return 1;
  } finally {
    client.close();
  }
}

main().then((code) => { process.exitCode = code; });
