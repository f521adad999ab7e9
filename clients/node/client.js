'use strict';
// Node.js client for baton.v1.GenerationService.
//
// The stubs are generated at load time from ../../protos/baton/v1/baton.proto by
// @grpc/proto-loader, so this client always matches the checked-in contract; there is no
// generated code to keep in sync. Messages use the proto's own field names (snake_case:
// `finish_reason`, `token_ids`, `usage.completion_tokens`), enums arrive as their names
// ('LENGTH', 'RUNNING'), and 64-bit integers as JS numbers.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const DEFAULT_TARGET = '127.0.0.1:50051';
const PROTO_DIR = process.env.BATON_PROTO_DIR || path.resolve(__dirname, '..', '..', 'protos');
const PROTO_FILE = 'baton/v1/baton.proto';

const LOADER_OPTIONS = {
  keepCase: true,   // field names exactly as in the .proto
  enums: String,    // enum values as names
  longs: Number,    // uint64 fields as numbers
  defaults: true,   // unset fields present with their zero values
  oneofs: true,
};

// grpc.health.v1, inlined (grpc-js does not ship health.proto) so that waitReady() uses the
// standard health check that the server registers.
const HEALTH_JSON = {
  nested: { grpc: { nested: { health: { nested: { v1: { nested: {
    HealthCheckRequest: { fields: { service: { type: 'string', id: 1 } } },
    HealthCheckResponse: {
      fields: { status: { type: 'ServingStatus', id: 1 } },
      nested: { ServingStatus: { values: { UNKNOWN: 0, SERVING: 1, NOT_SERVING: 2, SERVICE_UNKNOWN: 3 } } },
    },
    Health: { methods: { Check: { requestType: 'HealthCheckRequest', responseType: 'HealthCheckResponse' } } },
  } } } } } } },
};

let cached = null;
function loadProtos() {
  if (cached === null) {
    const baton = protoLoader.loadSync(PROTO_FILE, { ...LOADER_OPTIONS, includeDirs: [PROTO_DIR] });
    const health = protoLoader.fromJSON(HEALTH_JSON, LOADER_OPTIONS);
    cached = {
      baton: grpc.loadPackageDefinition(baton).baton.v1,
      health: grpc.loadPackageDefinition(health).grpc.health.v1,
    };
  }
  return cached;
}

// Numeric gRPC status code -> name ('CANCELLED', 'NOT_FOUND', ...).
const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));
function statusName(code) {
  return STATUS_NAMES[code] || `UNKNOWN_CODE_${code}`;
}

const ACTIONS = new Set(['ACTION_UNSPECIFIED', 'SUSPEND', 'RESUME', 'CANCEL']);

// Metadata header that lets a load balancer send a request's Generate and Preempt to one replica
// (docs/deployment.md). Sent whenever the request id can be a header value: printable ASCII, at
// most 128 characters (the server's own limit); other ids go without it and the server reports them.
const ROUTING_HEADER = 'x-baton-request-id';
function routable(requestId) {
  return typeof requestId === 'string' && requestId.length > 0 && requestId.length <= 128
    && /^[\x20-\x7e]+$/.test(requestId);
}

// Build a GenerateRequest. `input` is a prompt string or an object
// { prompt, messages: [{role, content}], request_id, priority, params: {max_new_tokens, ...} }.
// Params may also be given at the top level (max_new_tokens, temperature, ...).
function buildGenerateRequest(input) {
  const req = typeof input === 'string' ? { prompt: input } : { ...input };
  const { prompt = '', messages = [], request_id = '', priority = 0, params = {}, ...rest } = req;
  const merged = { ...rest, ...params };
  if (merged.seed === null || merged.seed === undefined) delete merged.seed;
  return { prompt, messages, request_id, priority, params: merged };
}

class BatonClient {
  /**
   * @param {string} [target] host:port; defaults to BATON_TARGET or 127.0.0.1:50051.
   * @param {object} [opts] { credentials, channelOptions, metadata: {key: value} }
   */
  constructor(target, opts = {}) {
    const { baton, health } = loadProtos();
    this.target = target || process.env.BATON_TARGET || DEFAULT_TARGET;
    const creds = opts.credentials || grpc.credentials.createInsecure();
    this.stub = new baton.GenerationService(this.target, creds, opts.channelOptions || {});
    // Share the channel with the health stub.
    this.healthStub = new health.Health(this.target, creds, { channelOverride: this.stub.getChannel() });
    this.metadata = new grpc.Metadata();
    for (const [k, v] of Object.entries(opts.metadata || {})) this.metadata.set(k, v);
  }

  // The client's metadata, plus the routing header for `requestId` when it can be one.
  _metadataFor(requestId) {
    if (!routable(requestId)) return this.metadata;
    const md = this.metadata.clone();
    md.set(ROUTING_HEADER, requestId);
    return md;
  }

  _callOptions(timeoutMs) {
    return timeoutMs ? { deadline: new Date(Date.now() + timeoutMs) } : {};
  }

  /**
   * Start a Generate stream. Returns the grpc-js ClientReadableStream: iterate it with
   * `for await (const msg of call)` (or listen to 'data' / 'end' / 'error' / 'status'),
   * and call `call.cancel()` to stop it; the stream then fails with status CANCELLED and the
   * server aborts the request. A request_id set by the caller also goes as the
   * `x-baton-request-id` header (routing: a Preempt for it reaches the same replica).
   * Log-probabilities: params { logprobs: true } or { top_logprobs: N } (0..20); each message
   * then has `logprobs: [{ token_id, logprob, top: [{ token_id, logprob }] }]`, one per token id.
   * @param {string|object} input see buildGenerateRequest
   * @param {object} [opts] { timeoutMs }
   */
  generate(input, opts = {}) {
    const req = buildGenerateRequest(input);
    return this.stub.Generate(req, this._metadataFor(req.request_id), this._callOptions(opts.timeoutMs));
  }

  /**
   * Run a Generate stream to its end and fold it. `opts.onMessage(msg, call)` sees each message.
   * Resolves { request_id, text, token_ids, logprobs, states, finish_reason, stop_sequence, usage, stats, messages }.
   */
  async complete(input, opts = {}) {
    const call = this.generate(input, opts);
    const out = { request_id: '', text: '', token_ids: [], logprobs: [], states: [], finish_reason: '',
      stop_sequence: '', usage: null, stats: null, messages: [] };
    for await (const msg of call) {
      out.messages.push(msg);
      out.request_id = msg.request_id || out.request_id;
      out.text += msg.text;
      out.token_ids.push(...msg.token_ids);
      out.logprobs.push(...msg.logprobs);
      if (msg.state && msg.state !== 'REQUEST_STATE_UNSPECIFIED') out.states.push(msg.state);
      if (msg.finish_reason && msg.finish_reason !== 'FINISH_REASON_UNSPECIFIED') {
        out.finish_reason = msg.finish_reason;
        out.usage = msg.usage;
        out.stop_sequence = msg.stop_sequence;
        out.stats = msg.stats;
      }
      if (opts.onMessage) opts.onMessage(msg, call);
    }
    return out;
  }

  _unary(method, request, timeoutMs, metadata = this.metadata) {
    return new Promise((resolve, reject) => {
      this.stub[method](request, metadata, this._callOptions(timeoutMs), (err, resp) => (err ? reject(err) : resolve(resp)));
    });
  }

  /**
   * Preempt(request_id, action): action is 'suspend' | 'resume' | 'cancel' (any case), or
   * 'ACTION_UNSPECIFIED' / 'priority' with `priority` set to change the priority only.
   * Resolves the PreemptResponse { request_id, state }. Sends the `x-baton-request-id` header.
   * opts: { timeoutMs, caller } (caller: with auth on, admins only, whose request id it is).
   */
  preempt(requestId, action, priority = undefined, opts = {}) {
    let name = String(action).toUpperCase();
    if (name === 'PRIORITY') name = 'ACTION_UNSPECIFIED';
    if (!ACTIONS.has(name)) throw new Error(`unknown preempt action: ${action}`);
    const req = { request_id: requestId, action: name, caller: opts.caller || '' };
    if (priority !== undefined && priority !== null) req.priority = priority;
    return this._unary('Preempt', req, opts.timeoutMs, this._metadataFor(requestId));
  }

  /** GetModelInfo: resolves the ModelInfo message. */
  modelInfo(opts = {}) {
    return this._unary('GetModelInfo', {}, opts.timeoutMs);
  }

  /** Tokenize a prompt (string) or chat messages ([{role, content}]). Resolves { token_ids, tokens }. */
  tokenize(input, opts = {}) {
    const req = typeof input === 'string' ? { prompt: input } : { messages: input };
    return this._unary('Tokenize', req, opts.timeoutMs);
  }

  /** Standard grpc.health.v1 check; resolves the status name ('SERVING', ...). */
  health(service = '', opts = {}) {
    return new Promise((resolve, reject) => {
      this.healthStub.Check({ service }, this.metadata, this._callOptions(opts.timeoutMs || 5000),
        (err, resp) => (err ? reject(err) : resolve(resp.status)));
    });
  }

  /** Poll health until SERVING (the model is loaded) or timeoutMs passes. */
  async waitReady(timeoutMs = 120000, pollMs = 250) {
    const deadline = Date.now() + timeoutMs;
    let last = 'no answer';
    while (Date.now() < deadline) {
      try {
        last = await this.health('', { timeoutMs: Math.max(1000, Math.min(5000, deadline - Date.now())) });
        if (last === 'SERVING') return;
      } catch (err) {
        last = `${statusName(err.code)}: ${err.details || err.message}`;
      }
      await new Promise((r) => setTimeout(r, pollMs));
    }
    throw new Error(`server at ${this.target} not SERVING after ${timeoutMs} ms (last: ${last})`);
  }

  close() {
    this.stub.close();
  }
}

module.exports = { BatonClient, buildGenerateRequest, statusName, grpc, DEFAULT_TARGET, ROUTING_HEADER };
