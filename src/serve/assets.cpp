#include "serve/assets.h"

// The build passes the two files' paths (KILN_DASHBOARD_HTML, KILN_CHART_JS); the assembler
// copies their bytes into the read-only data of this object.
#define KILN_INCBIN(name, path)           \
    __asm__(                              \
        ".section .rodata\n"              \
        ".global " #name "_begin\n" #name \
        "_begin:\n"                       \
        ".incbin \"" path                 \
        "\"\n"                            \
        ".global " #name "_end\n" #name   \
        "_end:\n"                         \
        ".byte 0\n"                       \
        ".previous\n");                   \
    extern "C" const char name##_begin[]; \
    extern "C" const char name##_end[];

KILN_INCBIN(kiln_dashboard_html, KILN_DASHBOARD_HTML)
KILN_INCBIN(kiln_chart_js, KILN_CHART_JS)

namespace kiln::serve {

std::string_view dashboard_html() {
    return {kiln_dashboard_html_begin, size_t(kiln_dashboard_html_end - kiln_dashboard_html_begin)};
}

std::string_view chart_js() {
    return {kiln_chart_js_begin, size_t(kiln_chart_js_end - kiln_chart_js_begin)};
}

}  // namespace kiln::serve
