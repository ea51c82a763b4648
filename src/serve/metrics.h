// Prometheus text exposition (format 0.0.4) for /metrics: gauges, counters and
// histograms with HELP and TYPE lines, written family by family.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace dsv4::serve {

using MetricLabels = std::vector<std::pair<std::string, std::string>>;

class PrometheusWriter {
 public:
  // One sample per call; repeat a name with different labels for more samples of
  // the same family (HELP/TYPE are written once, on the first).
  void gauge(const std::string& name, const std::string& help, double value, const MetricLabels& labels = {});
  void counter(const std::string& name, const std::string& help, double value, const MetricLabels& labels = {});
  // Cumulative bucket counts for the upper bounds `bounds` (ascending, +Inf implied).
  void histogram(const std::string& name, const std::string& help, const std::vector<double>& bounds,
                 const std::vector<uint64_t>& cumulative, uint64_t count, double sum);
  const std::string& text() const { return out_; }

 private:
  void family(const std::string& name, const std::string& help, const char* type);
  void sample(const std::string& name, const MetricLabels& labels, double value);

  std::string out_;
  std::vector<std::string> families_;
};

// A thread-safe latency histogram (seconds).
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void observe(double value);
  void write(PrometheusWriter& w, const std::string& name, const std::string& help) const;

 private:
  std::vector<double> bounds_;
  mutable std::mutex mutex_;
  std::vector<uint64_t> counts_;  // per bucket, last = +Inf
  uint64_t count_ = 0;
  double sum_ = 0.0;
};

// Prometheus float formatting: shortest round-trip, "+Inf", "-Inf", "NaN".
std::string prometheus_number(double value);
// Label values escape \, " and newlines.
std::string prometheus_escape(const std::string& value);

}  // namespace dsv4::serve
