#include "serve/metrics.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

namespace dsv4::serve {

std::string prometheus_number(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  if (value == std::floor(value) && std::fabs(value) < 1e15) return fmt::format("{}", int64_t(value));
  return fmt::format("{}", value);
}

std::string prometheus_escape(const std::string& value) {
  std::string out;
  out.reserve(value.size());
  for (char c : value) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

void PrometheusWriter::family(const std::string& name, const std::string& help, const char* type) {
  if (std::find(families_.begin(), families_.end(), name) != families_.end()) return;
  families_.push_back(name);
  std::string escaped;
  for (char c : help) escaped += c == '\n' ? std::string("\\n") : c == '\\' ? std::string("\\\\") : std::string(1, c);
  out_ += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, escaped, name, type);
}

void PrometheusWriter::sample(const std::string& name, const MetricLabels& labels, double value) {
  out_ += name;
  if (!labels.empty()) {
    out_ += '{';
    for (size_t i = 0; i < labels.size(); ++i)
      out_ += fmt::format("{}{}=\"{}\"", i ? "," : "", labels[i].first, prometheus_escape(labels[i].second));
    out_ += '}';
  }
  out_ += ' ';
  out_ += prometheus_number(value);
  out_ += '\n';
}

void PrometheusWriter::gauge(const std::string& name, const std::string& help, double value,
                             const MetricLabels& labels) {
  family(name, help, "gauge");
  sample(name, labels, value);
}

void PrometheusWriter::counter(const std::string& name, const std::string& help, double value,
                               const MetricLabels& labels) {
  family(name, help, "counter");
  sample(name, labels, value);
}

void PrometheusWriter::histogram(const std::string& name, const std::string& help, const std::vector<double>& bounds,
                                 const std::vector<uint64_t>& cumulative, uint64_t count, double sum) {
  family(name, help, "histogram");
  for (size_t i = 0; i < bounds.size(); ++i)
    sample(name + "_bucket", {{"le", prometheus_number(bounds[i])}}, double(cumulative[i]));
  sample(name + "_bucket", {{"le", "+Inf"}}, double(count));
  sample(name + "_sum", {}, sum);
  sample(name + "_count", {}, double(count));
}

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double value) {
  const size_t bucket = size_t(std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin());
  std::lock_guard<std::mutex> lock(mutex_);
  ++counts_[bucket];
  ++count_;
  sum_ += value;
}

void Histogram::write(PrometheusWriter& w, const std::string& name, const std::string& help) const {
  std::vector<uint64_t> cumulative(bounds_.size());
  uint64_t count = 0;
  double sum = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    uint64_t running = 0;
    for (size_t i = 0; i < bounds_.size(); ++i) cumulative[i] = running += counts_[i];
    count = count_;
    sum = sum_;
  }
  w.histogram(name, help, bounds_, cumulative, count, sum);
}

}  // namespace dsv4::serve
