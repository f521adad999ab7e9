// baton_cpp_client TARGET PROMPT [max_new_tokens]
//
// Streams the completion of PROMPT from a Baton server (baton.v1.GenerationService/Generate)
// to stdout, then prints the finish reason and token usage to stderr. On a gRPC error it prints
// the status code name (e.g. INVALID_ARGUMENT) and message to stderr and exits 1.
// SIGINT / SIGTERM cancel the call (the server then aborts the request).
#include <csignal>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>
#include <thread>

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

int Usage(const char* argv0) {
  std::cerr << "usage: " << argv0 << " TARGET PROMPT [max_new_tokens]\n"
            << "  TARGET          host:port of a Baton server, e.g. 127.0.0.1:50051\n"
            << "  max_new_tokens  0 or absent = server default\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4) return Usage(argv[0]);
  const std::string target = argv[1];
  const std::string prompt = argv[2];
  unsigned long max_new_tokens = 0;
  if (argc == 4) {
    char* end = nullptr;
    max_new_tokens = std::strtoul(argv[3], &end, 10);
    if (end == argv[3] || *end != '\0' || argv[3][0] == '-' || max_new_tokens > 0xFFFFFFFFul) {
      std::cerr << "max_new_tokens must be a non-negative integer, got '" << argv[3] << "'\n";
      return Usage(argv[0]);
    }
  }

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
  request.mutable_params()->set_max_new_tokens(static_cast<uint32_t>(max_new_tokens));

  grpc::ClientContext context;
  std::thread([&context, signals]() {
    int sig = 0;
    if (sigwait(&signals, &sig) == 0) context.TryCancel();
  }).detach();

  std::unique_ptr<grpc::ClientReader<baton::v1::GenerateResponse>> reader(stub->Generate(&context, request));
  baton::v1::GenerateResponse msg;
  baton::v1::GenerateResponse last;
  bool finished = false;
  uint64_t tokens_received = 0;
  while (reader->Read(&msg)) {
    if (!msg.text().empty()) std::cout << msg.text() << std::flush;
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
  std::cerr << "request_id=" << last.request_id()
            << " finish_reason=" << baton::v1::FinishReason_Name(last.finish_reason())
            << " prompt_tokens=" << last.usage().prompt_tokens()
            << " completion_tokens=" << last.usage().completion_tokens()
            << " tokens_received=" << tokens_received << "\n";
  return 0;
}
