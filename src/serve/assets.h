#pragma once
// Files the dashboard needs, built into the binary so that `kiln serve` needs nothing on disk:
// the page itself (serve/dashboard.html) and Chart.js (from Debian's libjs-chart.js).
#include <string_view>

namespace kiln::serve {

std::string_view dashboard_html();
std::string_view chart_js();

}  // namespace kiln::serve
