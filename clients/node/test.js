'use strict';
// Tests against a live server: BATON_TARGET=127.0.0.1:50051 node --test test.js
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { randomUUID } = require('node:crypto');
const { BatonClient, grpc, statusName } = require('./client');

const TARGET = process.env.BATON_TARGET;
const skip = TARGET ? false : 'BATON_TARGET is not set (host:port of a running Baton server)';
const TIMEOUT = 60_000;
// A request that runs long enough to be cancelled mid-way.
const LONG = { max_new_tokens: 200, ignore_eos: true };

let client;
before(async () => {
  if (skip) return;
  client = new BatonClient(TARGET);
  await client.waitReady(Number(process.env.BATON_READY_TIMEOUT_MS || 180_000));
});
after(() => client && client.close());

// Resolves with the error that ends `call` (or rejects if it ends cleanly), after collecting messages.
async function drainExpectingError(call, seen) {
  try {
    for await (const msg of call) seen.push(msg);
  } catch (err) {
    return err;
  }
  assert.fail(`stream ended without an error after ${seen.length} messages`);
}

test('GetModelInfo describes the loaded model', { skip, timeout: TIMEOUT }, async () => {
  const info = await client.modelInfo();
  assert.ok(info.model_name.length > 0);
  assert.ok(info.max_context_length > 0);
  assert.ok(info.vocab_size > 0);
});

test('Generate streams several messages ending with LENGTH and matching usage', { skip, timeout: TIMEOUT }, async () => {
  const maxNew = 12;
  const messages = [];
  let text = '';
  let tokenIds = [];
  for await (const msg of client.generate({ prompt: 'The capital of France is', params: { max_new_tokens: maxNew, ignore_eos: true } })) {
    messages.push(msg);
    text += msg.text;
    tokenIds = tokenIds.concat(msg.token_ids);
  }
  assert.ok(messages.length > 1, `expected several messages, got ${messages.length}`);
  assert.ok(text.length > 0, 'concatenated text is empty');
  const last = messages[messages.length - 1];
  assert.equal(last.finish_reason, 'LENGTH');
  assert.equal(last.state, 'FINISHED');
  assert.ok(last.usage, 'last message has no usage');
  assert.equal(last.usage.completion_tokens, tokenIds.length);
  assert.equal(tokenIds.length, maxNew);
  assert.ok(last.usage.prompt_tokens > 0);
  // Only the last message carries a finish reason; all carry the same request id.
  for (const msg of messages.slice(0, -1)) assert.equal(msg.finish_reason, 'FINISH_REASON_UNSPECIFIED');
  assert.ok(last.request_id.length > 0);
  for (const msg of messages) assert.equal(msg.request_id, last.request_id);
});

test('complete() folds a stream and keeps a client-chosen request id', { skip, timeout: TIMEOUT }, async () => {
  const id = `node-complete-${randomUUID()}`;
  const out = await client.complete({ prompt: 'Hello', request_id: id, max_new_tokens: 4, ignore_eos: true });
  assert.equal(out.request_id, id);
  assert.equal(out.finish_reason, 'LENGTH');
  assert.equal(out.usage.completion_tokens, out.token_ids.length);
});

test('cancelling a stream mid-way ends it with CANCELLED on the client', { skip, timeout: TIMEOUT }, async () => {
  const call = client.generate({ prompt: 'Count to one hundred:', params: LONG });
  const seen = [];
  let tokens = 0;
  let err = null;
  try {
    for await (const msg of call) {
      seen.push(msg);
      tokens += msg.token_ids.length;
      if (tokens > 0) call.cancel(); // idempotent; the next read fails with CANCELLED
    }
  } catch (e) {
    err = e;
  }
  assert.ok(err, `stream ended without an error after ${seen.length} messages`);
  assert.equal(err.code, grpc.status.CANCELLED, `got ${statusName(err.code)}: ${err.details}`);
  assert.ok(tokens > 0 && tokens < LONG.max_new_tokens, `received ${tokens} tokens`);
  assert.ok(!seen.some((m) => m.finish_reason !== 'FINISH_REASON_UNSPECIFIED'), 'a finish message arrived');
});

test('Preempt CANCEL on a running request ends its stream with finish_reason CANCELLED', { skip, timeout: TIMEOUT }, async () => {
  const id = `node-preempt-${randomUUID()}`;
  const messages = [];
  let preempted = null;
  for await (const msg of client.generate({ prompt: 'Write a long story about a dragon.', request_id: id, params: LONG })) {
    messages.push(msg);
    if (preempted === null && msg.token_ids.length > 0) {
      preempted = client.preempt(id, 'cancel'); // awaited below; the stream keeps flowing meanwhile
    }
  }
  assert.ok(preempted !== null, 'no tokens arrived before the stream ended');
  const resp = await preempted;
  assert.equal(resp.request_id, id);
  const last = messages[messages.length - 1];
  assert.equal(last.finish_reason, 'CANCELLED');
  assert.equal(last.request_id, id);
  const received = messages.reduce((n, m) => n + m.token_ids.length, 0);
  assert.ok(received < LONG.max_new_tokens, `all ${received} tokens arrived: the cancel came too late`);
  assert.equal(last.usage.completion_tokens, received);
});

test('Preempt on an unknown request id gives NOT_FOUND', { skip, timeout: TIMEOUT }, async () => {
  await assert.rejects(client.preempt(`node-missing-${randomUUID()}`, 'CANCEL'), (err) => {
    assert.equal(statusName(err.code), 'NOT_FOUND');
    return true;
  });
});

test('an empty prompt gives INVALID_ARGUMENT', { skip, timeout: TIMEOUT }, async () => {
  const seen = [];
  const err = await drainExpectingError(client.generate({ prompt: '', params: { max_new_tokens: 4 } }), seen);
  assert.equal(statusName(err.code), 'INVALID_ARGUMENT');
  assert.equal(seen.length, 0);
});

test('top_logprobs: one TokenLogprob per token id, N alternatives, most likely first', { skip, timeout: TIMEOUT }, async () => {
  const out = await client.complete({ prompt: 'The capital of France is', params: { max_new_tokens: 6, ignore_eos: true, top_logprobs: 3 } });
  assert.equal(out.logprobs.length, out.token_ids.length);
  out.logprobs.forEach((lp, i) => {
    assert.equal(lp.token_id, out.token_ids[i]);
    assert.ok(lp.logprob <= 0, `logprob ${lp.logprob} > 0`);
    assert.equal(lp.top.length, 3);
    assert.equal(lp.top[0].token_id, lp.token_id); // greedy: the chosen token is the most likely
    for (let k = 1; k < lp.top.length; k++) assert.ok(lp.top[k].logprob <= lp.top[k - 1].logprob);
  });
});

test('Preempt sends caller: with auth off a named caller is INVALID_ARGUMENT', { skip, timeout: TIMEOUT }, async () => {
  await assert.rejects(client.preempt(`node-missing-${randomUUID()}`, 'cancel', undefined, { caller: 'bob' }), (err) => {
    assert.equal(statusName(err.code), 'INVALID_ARGUMENT');
    assert.match(err.details, /caller/);
    return true;
  });
});
