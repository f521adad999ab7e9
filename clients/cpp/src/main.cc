// baton_cpp_client [--logprobs N] [--request-id ID] TARGET PROMPT [max_new_tokens]
//
// Streams the completion of PROMPT from a Baton server (baton.v1.GenerationService/Generate)
// to stdout, then prints the finish reason and token usage to stderr. On a gRPC error it prints
// the status code name (e.g. INVALID_ARGUMENT) and message to stderr and exits 1.
// SIGINT / SIGTERM cancel the call (the server then aborts the request).
// The request id (--request-id, else a random one) is sent in the request and as the
// x-baton-request-id routing header, so a load balancer sends a Preempt for it to this replica.
// --logprobs N: after the text, one line per generated token with its log-probability and the N
// most likely alternatives (0..20; 0 = the chosen token's only).
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "baton/v1/baton.grpc.pb.h"

namespace {

const char* StatusCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNKNOWN_STATUS_CODE";
  }
}

const char kRoutingHeader[] = "x-baton-request-id";

int Usage(const char* argv0) {
  std::cerr << "usage: " << argv0 << " [--logprobs N] [--request-id ID] TARGET PROMPT [max_new_tokens]\n"
            << "  TARGET          host:port of a Baton server, e.g. 127.0.0.1:50051\n"
            << "  max_new_tokens  0 or absent = server default\n"
            << "  --logprobs N    print each token's log-probability and N alternatives (0..20)\n"
            << "  --request-id ID the request's id (default: a random one)\n";
  return 2;
}

// A non-negative integer no larger than `max`, or false.
bool ParseUnsigned(const char* text, unsigned long max, unsigned long* out) {
  char* end = nullptr;
  *out = std::strtoul(text, &end, 10);
  return end != text && *end == '\0' && text[0] != '-' && *out <= max;
}

std::string RandomRequestId() {
  std::random_device device;
  std::mt19937_64 gen((static_cast<uint64_t>(device()) << 32) ^ device());
  char buf[33];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(gen()),
                static_cast<unsigned long long>(gen()));
  return buf;
}

// The header carries the id when it can: printable ASCII, at most 128 characters (the server's limit).
bool Routable(const std::string& id) {
  if (id.empty() || id.size() > 128) return false;
  for (unsigned char c : id) {
    if (c < 0x20 || c > 0x7e) return false;
  }
  return true;
}

// The message's text as a quoted string with JSON-style escapes for control characters.
std::string Quoted(const std::string& text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

// One line per token: the message's text (on its first token), id, logprob, top alternatives id:logprob.
void PrintLogprobs(const std::vector<baton::v1::GenerateResponse>& messages) {
  std::cout << "[log-probabilities: text, token id, logprob, top alternatives id:logprob]\n" << std::fixed;
  for (const auto& msg : messages) {
    for (int i = 0; i < msg.logprobs_size(); ++i) {
      const auto& lp = msg.logprobs(i);
      std::cout << std::setw(16) << (i == 0 ? Quoted(msg.text()) : "") << " " << std::setw(7) << lp.token_id()
                << " " << std::setw(9) << std::setprecision(4) << lp.logprob();
      for (const auto& top : lp.top()) std::cout << "  " << top.token_id() << ":" << top.logprob();
      std::cout << "\n";
    }
  }
  std::cout << std::flush;
}

}  // namespace

int main(int argc, char** argv) {
  long logprobs = -1;  // -1: off
  std::string request_id;
  int arg = 1;
  for (; arg < argc && std::string(argv[arg]).rfind("--", 0) == 0; ++arg) {
    const std::string flag = argv[arg];
    if (arg + 1 >= argc) return Usage(argv[0]);
    if (flag == "--logprobs") {
      unsigned long n = 0;
      if (!ParseUnsigned(argv[++arg], 20, &n)) {
        std::cerr << "--logprobs must be an integer in [0, 20], got '" << argv[arg] << "'\n";
        return Usage(argv[0]);
      }
      logprobs = static_cast<long>(n);
    } else if (flag == "--request-id") {
      request_id = argv[++arg];
    } else {
      std::cerr << "unknown option " << flag << "\n";
      return Usage(argv[0]);
    }
  }
  const int positional = argc - arg;
  if (positional < 2 || positional > 3) return Usage(argv[0]);
  const std::string target = argv[arg];
  const std::string prompt = argv[arg + 1];
  unsigned long max_new_tokens = 0;
  if (positional == 3 && !ParseUnsigned(argv[arg + 2], 0xFFFFFFFFul, &max_new_tokens)) {
    std::cerr << "max_new_tokens must be a non-negative integer, got '" << argv[arg + 2] << "'\n";
    return Usage(argv[0]);
  }
  if (request_id.empty()) request_id = RandomRequestId();

  // Block SIGINT/SIGTERM before gRPC starts its threads, and turn them into a call cancel on a
  // thread of our own (TryCancel is not async-signal-safe, so not from a handler).
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  auto channel = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
  auto stub = baton::v1::GenerationService::NewStub(channel);

  baton::v1::GenerateRequest request;
  request.set_prompt(prompt);
  request.set_request_id(request_id);
  request.mutable_params()->set_max_new_tokens(static_cast<uint32_t>(max_new_tokens));
  if (logprobs >= 0) {
    request.mutable_params()->set_logprobs(true);
    request.mutable_params()->set_top_logprobs(static_cast<uint32_t>(logprobs));
  }

  grpc::ClientContext context;
  if (Routable(request_id)) context.AddMetadata(kRoutingHeader, request_id);
  std::thread([&context, signals]() {
    int sig = 0;
    if (sigwait(&signals, &sig) == 0) context.TryCancel();
  }).detach();

  std::unique_ptr<grpc::ClientReader<baton::v1::GenerateResponse>> reader(stub->Generate(&context, request));
  baton::v1::GenerateResponse msg;
  baton::v1::GenerateResponse last;
  bool finished = false;
  uint64_t tokens_received = 0;
  std::vector<baton::v1::GenerateResponse> scored;  // messages with log-probabilities (--logprobs)
  while (reader->Read(&msg)) {
    if (!msg.text().empty()) std::cout << msg.text() << std::flush;
    if (logprobs >= 0) scored.push_back(msg);
    tokens_received += static_cast<uint64_t>(msg.token_ids_size());
    if (msg.finish_reason() != baton::v1::FINISH_REASON_UNSPECIFIED) {
      last = msg;
      finished = true;
    }
  }
  grpc::Status status = reader->Finish();
  if (tokens_received > 0) std::cout << "\n" << std::flush;
  if (!status.ok()) {
    std::cerr << "error: " << StatusCodeName(status.error_code()) << ": " << status.error_message() << "\n";
    return 1;
  }
  if (!finished) {
    std::cerr << "error: stream ended without a finish reason\n";
    return 1;
  }
  if (logprobs >= 0) PrintLogprobs(scored);
  std::cerr << "request_id=" << last.request_id()
            << " finish_reason=" << baton::v1::FinishReason_Name(last.finish_reason())
            << " prompt_tokens=" << last.usage().prompt_tokens()
            << " completion_tokens=" << last.usage().completion_tokens()
            << " tokens_received=" << tokens_received << "\n";
  return 0;
}
