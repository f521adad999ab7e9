#!/usr/bin/env node
'use strict';
// Stream a completion to stdout:
//   BATON_TARGET=127.0.0.1:50051 node example.js [--max-new-tokens N] [--chat] PROMPT...
// The finish reason and token usage go to stderr. Ctrl-C cancels the request.
const { BatonClient, statusName } = require('./client');

function parseArgs(argv) {
  const opts = { maxNewTokens: 0, chat: false, words: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--max-new-tokens' || a === '-n') opts.maxNewTokens = Number(argv[++i]);
    else if (a.startsWith('--max-new-tokens=')) opts.maxNewTokens = Number(a.split('=')[1]);
    else if (a === '--chat') opts.chat = true;
    else if (a === '-h' || a === '--help') opts.help = true;
    else opts.words.push(a);
  }
  return opts;
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const prompt = opts.words.join(' ');
  if (opts.help || !prompt || !Number.isInteger(opts.maxNewTokens) || opts.maxNewTokens < 0) {
    process.stderr.write('usage: node example.js [--max-new-tokens N] [--chat] PROMPT...\n'
      + '  target: BATON_TARGET (default 127.0.0.1:50051)\n');
    return 2;
  }
  const client = new BatonClient(process.env.BATON_TARGET);
  const request = opts.chat ? { messages: [{ role: 'user', content: prompt }] } : { prompt };
  request.params = { max_new_tokens: opts.maxNewTokens };
  const call = client.generate(request);
  process.on('SIGINT', () => call.cancel());
  try {
    for await (const msg of call) {
      if (msg.text) process.stdout.write(msg.text);
      if (msg.finish_reason !== 'FINISH_REASON_UNSPECIFIED') {
        const u = msg.usage || {};
        process.stdout.write('\n');
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
