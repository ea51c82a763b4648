// A true kill test: two processes (one GPU each) bootstrapped through the TCP rendezvous
// on 127.0.0.1 run collectives; one is SIGKILLed mid-run; the survivor must exit non-zero
// with a clear message within its timeout instead of hanging. Skips with fewer than 2 GPUs.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

std::string read_file(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// The physical device ids this process may use (CUDA_VISIBLE_DEVICES, or 0..n-1).
std::vector<std::string> visible_devices(int count) {
  std::vector<std::string> out;
  if (const char* env = std::getenv("CUDA_VISIBLE_DEVICES"); env && *env) {
    std::stringstream s(env);
    std::string item;
    while (std::getline(s, item, ',')) out.push_back(item);
  } else {
    for (int i = 0; i < count; ++i) out.push_back(std::to_string(i));
  }
  return out;
}

pid_t spawn_worker(int node_rank, int port, int timeout_ms, const std::string& device, const std::string& log) {
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e)
    if (std::strncmp(*e, "CUDA_VISIBLE_DEVICES=", 21) != 0) env.emplace_back(*e);
  env.push_back("CUDA_VISIBLE_DEVICES=" + device);
  std::vector<char*> envp;
  for (auto& s : env) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> args = {DSV4_KILL_WORKER, std::to_string(node_rank), std::to_string(port),
                                   std::to_string(timeout_ms)};
  std::vector<char*> argv;
  for (auto& s : args) argv.push_back(s.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  pid_t pid = -1;
  int rc = posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  EXPECT_EQ(rc, 0) << "cannot start " << argv[0] << ": " << std::strerror(rc);
  return rc == 0 ? pid : -1;
}

// waitpid with a deadline; true when the process exited (status in *status).
bool wait_exit(pid_t pid, milliseconds limit, int* status) {
  const auto deadline = Clock::now() + limit;
  while (Clock::now() < deadline) {
    pid_t r = waitpid(pid, status, WNOHANG);
    if (r == pid) return true;
    std::this_thread::sleep_for(milliseconds(20));
  }
  return false;
}

TEST(NcclKill, SurvivorFailsFastWhenPeerIsKilled) {
  int gpus = 0;
  if (cudaGetDeviceCount(&gpus) != cudaSuccess) gpus = 0;
  if (gpus < 2) GTEST_SKIP() << "needs 2 GPUs, this machine has " << gpus;
  const int kTimeoutMs = 3000;
  const char* tmp = std::getenv("DSV4_TEST_TMP");
  const std::string dir = tmp ? tmp : "/tmp";
  const std::string log0 = dir + "/nccl_kill_node0.log", log1 = dir + "/nccl_kill_node1.log";
  const auto devices = visible_devices(gpus);
  const int port = free_port();

  pid_t p0 = spawn_worker(0, port, kTimeoutMs, devices[0], log0);
  pid_t p1 = spawn_worker(1, port, kTimeoutMs, devices[1], log1);
  ASSERT_GT(p0, 0);
  ASSERT_GT(p1, 0);

  // Wait until both have completed a few iterations (NCCL init can take seconds).
  const auto ready_deadline = Clock::now() + milliseconds(120000);
  bool ready = false;
  int status = 0;
  while (Clock::now() < ready_deadline) {
    if (read_file(log0).find("iteration 3\n") != std::string::npos &&
        read_file(log1).find("iteration 3\n") != std::string::npos) {
      ready = true;
      break;
    }
    if (waitpid(p0, &status, WNOHANG) == p0 || waitpid(p1, &status, WNOHANG) == p1) break;
    std::this_thread::sleep_for(milliseconds(50));
  }
  if (!ready) {
    kill(p0, SIGKILL);
    kill(p1, SIGKILL);
    waitpid(p0, &status, 0);
    waitpid(p1, &status, 0);
    FAIL() << "workers did not start iterating\n--- node 0:\n" << read_file(log0) << "\n--- node 1:\n" << read_file(log1);
  }

  ASSERT_EQ(kill(p1, SIGKILL), 0);
  waitpid(p1, &status, 0);
  const auto killed_at = Clock::now();

  int status0 = 0;
  const bool exited = wait_exit(p0, milliseconds(kTimeoutMs + 30000), &status0);
  const double took_ms = std::chrono::duration<double, std::milli>(Clock::now() - killed_at).count();
  if (!exited) {
    kill(p0, SIGKILL);
    waitpid(p0, &status0, 0);
  }
  const std::string out = read_file(log0);
  std::fprintf(stderr, "[survivor exited %.0f ms after the kill; its log:]\n%s\n", took_ms, out.c_str());
  ASSERT_TRUE(exited) << "the survivor still ran " << took_ms << " ms after its peer was killed (timeout "
                      << kTimeoutMs << " ms)";
  ASSERT_TRUE(WIFEXITED(status0)) << "survivor died by signal " << (WIFSIGNALED(status0) ? WTERMSIG(status0) : 0);
  EXPECT_EQ(WEXITSTATUS(status0), 3) << "expected the worker's failure exit code";
  EXPECT_NE(out.find("kill worker node 0: error: rank 0: "), std::string::npos) << out;
  const bool clear = out.find("timed out after 3000 ms") != std::string::npos ||
                     out.find("NCCL reported an asynchronous error") != std::string::npos ||
                     out.find("communicator has failed") != std::string::npos;
  EXPECT_TRUE(clear) << out;
  EXPECT_LT(took_ms, kTimeoutMs + 15000);
}

}  // namespace
