/*
 * Sluice's C guest SDK: write a task as one function.
 *
 *     #include <sluice.h>
 *
 *     sluice_result run(const sluice_json *input) {
 *         if (!sluice_json_is_integer(input))
 *             return sluice_fail("the input is not an integer");
 *         int64_t x = sluice_json_int(input);
 *         sluice_log_info("attempt %u", sluice_attempt());
 *         if (x < 0)
 *             return sluice_retry(-1, "%lld is negative", (long long)x);
 *         return sluice_ok_fmt("%lld", (long long)x);
 *     }
 *
 * The input arrives parsed (sluice_json; the raw text is sluice_input_text()). A task returns an
 * output as JSON text (sluice_ok, sluice_ok_fmt, sluice_ok_buf) or a signal (sluice_fail,
 * sluice_retry, sluice_skip, sluice_pause, sluice_success). Messages are printf-style. A trap
 * (abort(), an out-of-bounds access, running out of memory) fails the run like a Rust panic, with
 * the last stderr lines, and stays retriable under the task's retry policy.
 *
 * What the manifest grants the task (`[tasks.NAME.grants]`) it reaches with C's own idioms, and
 * nothing else is reachable (deny by default):
 * - files: fopen/stdio (and the POSIX calls of wasi-libc) at the granted guest paths, e.g.
 *   fopen("/in/data.csv", "r") under `files = [{ host = "data/in", guest = "/in", mode = "ro" }]`.
 *   Outside the granted directories fopen fails (errno ENOTCAPABLE, "Capabilities
 *   insufficient"); writing under a read-only (`ro`) grant fails with EPERM.
 * - variables and secrets: sluice_env and sluice_secret (or getenv); the environment holds exactly
 *   the granted `env` and `secrets`, and is empty when nothing is granted.
 * - HTTP: sluice_http_request and its shorthands (below), over wasi:http; a URL outside the `http`
 *   grants fails with SLUICE_HTTP_ERR_HTTP_REQUEST_DENIED ("HttpRequestDenied").
 * - TCP: wasi-libc (WASI preview 1) has no socket(), and the SDK has no TCP helper: call the raw
 *   `wasi:sockets` bindings generated into task_c.h (`#include "task_c.h"`; the build puts it on
 *   the include path): wasi_sockets_tcp_create_socket_create_tcp_socket,
 *   wasi_sockets_instance_network_instance_network, then
 *   wasi_sockets_tcp_method_tcp_socket_start_connect and _finish_connect (polling the socket's
 *   pollable while it says WOULD_BLOCK); tests/polyglot/c/probe.c has an example. Only IP
 *   addresses: the world has no name lookup. Without a `tcp` grant, creating a socket fails with
 *   WASI_SOCKETS_NETWORK_ERROR_CODE_ACCESS_DENIED; an address outside the grants is refused the
 *   same way when connecting.
 *
 * Build with `guest-sdk/c/build <task.c or directory> <out.wasm>`. The contract is wit/task.wit
 * (world `task-c` of wit/guests.wit: world `task` plus wasi:http and TCP socket creation).
 */
#ifndef SLUICE_H
#define SLUICE_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SLUICE_PRINTF(f, a) __attribute__((__format__(__printf__, f, a)))

/* ---- JSON values ------------------------------------------------------------------------- */

typedef enum sluice_json_type {
    SLUICE_JSON_NULL,
    SLUICE_JSON_BOOL,
    SLUICE_JSON_NUMBER,
    SLUICE_JSON_STRING,
    SLUICE_JSON_ARRAY,
    SLUICE_JSON_OBJECT,
} sluice_json_type;

/* A parsed JSON value (a tree; free the root with sluice_json_free). */
typedef struct sluice_json sluice_json;

/* Parse `len` bytes of JSON text. NULL on error, with a message in `error` (static storage) when
 * `error` is not NULL. Nesting deeper than 512 levels is an error. */
sluice_json *sluice_json_parse(const char *text, size_t len, const char **error);
void sluice_json_free(sluice_json *v);

sluice_json_type sluice_json_typeof(const sluice_json *v);
bool sluice_json_is_null(const sluice_json *v);
bool sluice_json_is_bool(const sluice_json *v);
bool sluice_json_is_number(const sluice_json *v);
/* A number written without fraction or exponent that fits in int64_t. */
bool sluice_json_is_integer(const sluice_json *v);
bool sluice_json_is_string(const sluice_json *v);
bool sluice_json_is_array(const sluice_json *v);
bool sluice_json_is_object(const sluice_json *v);

/* The value, or 0 / false / NULL when `v` is NULL or of another type. */
bool sluice_json_bool(const sluice_json *v);
double sluice_json_number(const sluice_json *v);
int64_t sluice_json_int(const sluice_json *v);
/* A string's bytes (UTF-8, NUL-terminated; may hold NULs, see sluice_json_string_len). */
const char *sluice_json_string(const sluice_json *v);
size_t sluice_json_string_len(const sluice_json *v);
/* Elements of an array, members of an object (0 for other types). */
size_t sluice_json_len(const sluice_json *v);
/* The i-th element of an array, or the i-th member's value of an object; NULL when out of range. */
const sluice_json *sluice_json_at(const sluice_json *v, size_t i);
/* The i-th member's key of an object; NULL when out of range. */
const char *sluice_json_key_at(const sluice_json *v, size_t i);
/* An object's member `key` (the last one when repeated); NULL when absent or not an object. */
const sluice_json *sluice_json_get(const sluice_json *v, const char *key);

/* ---- Building JSON text ------------------------------------------------------------------ */

/* A growable byte buffer. Zero-initialize it: `sluice_buf b = {0};`. Running out of memory
 * aborts (a trap: the run fails on its memory limit). */
typedef struct sluice_buf {
    char *data;
    size_t len;
    size_t cap;
} sluice_buf;

void sluice_buf_append(sluice_buf *b, const char *bytes, size_t len);
void sluice_buf_puts(sluice_buf *b, const char *s);
void sluice_buf_printf(sluice_buf *b, const char *fmt, ...) SLUICE_PRINTF(2, 3);
/* Append `s` (`len` bytes of UTF-8) as a quoted, escaped JSON string. */
void sluice_buf_json_string(sluice_buf *b, const char *s, size_t len);
/* Append a number as JSON (non-finite numbers become null). */
void sluice_buf_json_number(sluice_buf *b, double x);
/* Append a parsed value as compact JSON text. */
void sluice_buf_json(sluice_buf *b, const sluice_json *v);
void sluice_buf_free(sluice_buf *b);

/* ---- Results ----------------------------------------------------------------------------- */

typedef enum sluice_result_kind {
    SLUICE_OK,
    SLUICE_FAIL,
    SLUICE_RETRY,
    SLUICE_SKIP,
    SLUICE_PAUSE,
    SLUICE_SUCCESS,
} sluice_result_kind;

/* What a task returns; build it with the functions below (it owns its strings). */
typedef struct sluice_result {
    sluice_result_kind kind;
    char *output;     /* JSON text (OK, SUCCESS with an output), else NULL */
    size_t output_len;
    char *message;    /* the signal's message */
    int64_t delay_ms; /* RETRY: the delay, or -1 for the task's configured retry delay */
} sluice_result;

/* An output: JSON text (copied), printf-built JSON text, or a buffer (taken over). */
sluice_result sluice_ok(const char *json);
sluice_result sluice_ok_fmt(const char *fmt, ...) SLUICE_PRINTF(1, 2);
sluice_result sluice_ok_buf(sluice_buf *json);
/* Signals, each with a printf-style message. */
sluice_result sluice_fail(const char *fmt, ...) SLUICE_PRINTF(1, 2);
/* delay_ms < 0: the task's configured retry delay. */
sluice_result sluice_retry(int64_t delay_ms, const char *fmt, ...) SLUICE_PRINTF(2, 3);
sluice_result sluice_skip(const char *fmt, ...) SLUICE_PRINTF(1, 2);
sluice_result sluice_pause(const char *fmt, ...) SLUICE_PRINTF(1, 2);
/* Completed with a message; `output_json` may be NULL (no output). */
sluice_result sluice_success(const char *output_json, const char *fmt, ...) SLUICE_PRINTF(2, 3);

/* The task: implemented by the task's source. */
sluice_result run(const sluice_json *input);

/* The raw JSON text of the current run's input, NUL-terminated. */
const char *sluice_input_text(void);

/* ---- Context ----------------------------------------------------------------------------- */

/* A context key's value (malloc'd; free it), or NULL when unset. Built-in keys: flow_run_id,
 * task_run_id, task_name, attempt, map_index, parameters; the rest come from the flow. */
char *sluice_context_get(const char *key);
/* malloc'd strings; free them. */
char *sluice_flow_run_id(void);
char *sluice_task_run_id(void);
char *sluice_task_name(void);
/* The flow run's parameters as JSON text (malloc'd; free it). */
char *sluice_parameters(void);
/* The attempt number, starting at 1. */
uint32_t sluice_attempt(void);
/* Whether this is a child run of a mapped task; its index in `*index`. */
bool sluice_map_index(uint32_t *index);

/* ---- Granted variables and secrets ------------------------------------------------------- */

/* The environment variable `name` when the task is granted it (`env = { NAME = "..." }`), else
 * NULL. The string belongs to the environment: do not free it. */
const char *sluice_env(const char *name);
/* The value of secret `name` when the task is granted it (`secrets = ["NAME"]`; the host reads it
 * from its own `SLUICE_SECRET_NAME` variable or its `--secrets` file), else NULL. The host
 * replaces the value with `***` wherever it shows up in the run's logs, output or messages. */
const char *sluice_secret(const char *name);

/* ---- HTTP -------------------------------------------------------------------------------- */

/* Outbound HTTP over wasi:http, blocking: one request, the whole response read into memory. The
 * task's `http` grants decide which URLs it may reach; the host follows no redirects (a 3xx comes
 * back as it is) and caps the response bytes and the timeouts at the run's limits.
 *
 *     sluice_json *items;
 *     int err = sluice_http_get_json("https://api.example.com/items", &items);
 *     if (err) return sluice_retry(-1, "GET items: %s", sluice_http_error_name(err));
 *     ...
 *     sluice_json_free(items);
 *
 * Every function returns 0 or an error, a sluice_http_error: the cases of wasi:http's `error-code`
 * (wit/deps/http/http.wit) in their order, then the SDK's own. sluice_http_error_name names it. */
typedef enum sluice_http_error {
    SLUICE_HTTP_OK = 0,
    /* wasi:http `error-code`: the case's index + 1. */
    SLUICE_HTTP_ERR_DNS_TIMEOUT = 1,
    SLUICE_HTTP_ERR_DNS_ERROR,
    SLUICE_HTTP_ERR_DESTINATION_NOT_FOUND,
    SLUICE_HTTP_ERR_DESTINATION_UNAVAILABLE,
    SLUICE_HTTP_ERR_DESTINATION_IP_PROHIBITED,
    SLUICE_HTTP_ERR_DESTINATION_IP_UNROUTABLE,
    SLUICE_HTTP_ERR_CONNECTION_REFUSED,
    SLUICE_HTTP_ERR_CONNECTION_TERMINATED,
    SLUICE_HTTP_ERR_CONNECTION_TIMEOUT,
    SLUICE_HTTP_ERR_CONNECTION_READ_TIMEOUT,
    SLUICE_HTTP_ERR_CONNECTION_WRITE_TIMEOUT,
    SLUICE_HTTP_ERR_CONNECTION_LIMIT_REACHED,
    SLUICE_HTTP_ERR_TLS_PROTOCOL_ERROR,
    SLUICE_HTTP_ERR_TLS_CERTIFICATE_ERROR,
    SLUICE_HTTP_ERR_TLS_ALERT_RECEIVED,
    SLUICE_HTTP_ERR_HTTP_REQUEST_DENIED, /* the grants do not allow the URL (the run's log says) */
    SLUICE_HTTP_ERR_HTTP_REQUEST_LENGTH_REQUIRED,
    SLUICE_HTTP_ERR_HTTP_REQUEST_BODY_SIZE,
    SLUICE_HTTP_ERR_HTTP_REQUEST_METHOD_INVALID,
    SLUICE_HTTP_ERR_HTTP_REQUEST_URI_INVALID,
    SLUICE_HTTP_ERR_HTTP_REQUEST_URI_TOO_LONG,
    SLUICE_HTTP_ERR_HTTP_REQUEST_HEADER_SECTION_SIZE,
    SLUICE_HTTP_ERR_HTTP_REQUEST_HEADER_SIZE,
    SLUICE_HTTP_ERR_HTTP_REQUEST_TRAILER_SECTION_SIZE,
    SLUICE_HTTP_ERR_HTTP_REQUEST_TRAILER_SIZE,
    SLUICE_HTTP_ERR_HTTP_RESPONSE_INCOMPLETE,
    SLUICE_HTTP_ERR_HTTP_RESPONSE_HEADER_SECTION_SIZE,
    SLUICE_HTTP_ERR_HTTP_RESPONSE_HEADER_SIZE,
    SLUICE_HTTP_ERR_HTTP_RESPONSE_BODY_SIZE, /* past the run's response-bytes limit, too */
    SLUICE_HTTP_ERR_HTTP_RESPONSE_TRAILER_SECTION_SIZE,
    SLUICE_HTTP_ERR_HTTP_RESPONSE_TRAILER_SIZE,
    SLUICE_HTTP_ERR_HTTP_RESPONSE_TRANSFER_CODING,
    SLUICE_HTTP_ERR_HTTP_RESPONSE_CONTENT_CODING,
    SLUICE_HTTP_ERR_HTTP_RESPONSE_TIMEOUT,
    SLUICE_HTTP_ERR_HTTP_UPGRADE_FAILED,
    SLUICE_HTTP_ERR_HTTP_PROTOCOL_ERROR,
    SLUICE_HTTP_ERR_LOOP_DETECTED,
    SLUICE_HTTP_ERR_CONFIGURATION_ERROR,
    SLUICE_HTTP_ERR_INTERNAL_ERROR, /* 39 */
    /* The SDK's own. */
    SLUICE_HTTP_ERR_INVALID_URL = 100, /* not http:// or https:// with a host ("InvalidUrl") */
    SLUICE_HTTP_ERR_INVALID_HEADER,    /* a header without a value, malformed or forbidden */
    SLUICE_HTTP_ERR_INVALID_METHOD,    /* an empty or malformed method */
    SLUICE_HTTP_ERR_INVALID_ARGUMENT,  /* a NULL method, url or out; a NULL body with a length */
    SLUICE_HTTP_ERR_STATUS,            /* sluice_http_get_json: a status other than 2xx */
    SLUICE_HTTP_ERR_INVALID_JSON,      /* sluice_http_get_json: the body is not JSON */
    SLUICE_HTTP_ERR_STREAM,            /* a body stream failed without a wasi:http error code */
    SLUICE_HTTP_ERR_OUT_OF_MEMORY,
} sluice_http_error;

/* The error's name: the wasi:http case in CamelCase as the Python SDK spells it
 * ("HttpRequestDenied", "ConnectionRefused", "HttpResponseBodySize", "DnsError", ...), or the
 * SDK's ("InvalidUrl", "InvalidHeader", "InvalidMethod", "InvalidArgument", "Status",
 * "InvalidJson", "Stream", "OutOfMemory"); "Ok" for 0 and "Unknown" for other numbers. Static
 * storage. */
const char *sluice_http_error_name(int err);

/* A response header: its name (lower case) and value (`value_len` bytes, NUL-terminated). */
typedef struct sluice_http_header {
    char *name;
    char *value;
    size_t value_len;
} sluice_http_header;

/* A whole response. `body` is NUL-terminated (so text can be used as a string; it may hold
 * NULs: see body_len). Free it with sluice_http_response_free. */
typedef struct sluice_http_response {
    int status;
    sluice_http_header *headers; /* in the order received */
    size_t headers_len;
    uint8_t *body;
    size_t body_len;
} sluice_http_response;

/* Send one request and read the whole response into `*out`; 0 or a sluice_http_error.
 * `method`: "GET", "POST", ... (any token; case matters). `url`: http:// or https://, with a
 * path and query (a #fragment is not sent; user info is dropped). `headers`: NULL, or names and
 * values in turn ending with NULL, e.g. {"accept", "application/json", NULL}. `body`: NULL for
 * none, else `body_len` bytes, sent with a `content-length` header unless `headers` has one.
 * On an error `*out` is left empty (freeing it does nothing). A status other than 2xx is not an
 * error here. */
int sluice_http_request(const char *method, const char *url, const char *const *headers,
                        const uint8_t *body, size_t body_len, sluice_http_response *out);
/* sluice_http_request("GET", url, NULL, NULL, 0, out). */
int sluice_http_get(const char *url, sluice_http_response *out);
/* GET `url` (with `accept: application/json`) and parse the body into `*out` (free it with
 * sluice_json_free); a status other than 2xx is SLUICE_HTTP_ERR_STATUS, a body that is not JSON
 * SLUICE_HTTP_ERR_INVALID_JSON. `*out` is NULL on an error. */
int sluice_http_get_json(const char *url, sluice_json **out);
/* The first value of header `name` (any case), or NULL. */
const char *sluice_http_response_header(const sluice_http_response *r, const char *name);
/* Free what `r` holds and empty it (safe on an empty or already-freed response). */
void sluice_http_response_free(sluice_http_response *r);

/* ---- Logging ----------------------------------------------------------------------------- */

typedef enum sluice_log_level {
    SLUICE_TRACE,
    SLUICE_DEBUG,
    SLUICE_INFO,
    SLUICE_WARN,
    SLUICE_ERROR,
} sluice_log_level;

/* Record one line in the run's logs (printf to stdout/stderr is captured too). */
void sluice_log(sluice_log_level level, const char *fmt, ...) SLUICE_PRINTF(2, 3);
void sluice_vlog(sluice_log_level level, const char *fmt, va_list ap);
#define sluice_log_trace(...) sluice_log(SLUICE_TRACE, __VA_ARGS__)
#define sluice_log_debug(...) sluice_log(SLUICE_DEBUG, __VA_ARGS__)
#define sluice_log_info(...) sluice_log(SLUICE_INFO, __VA_ARGS__)
#define sluice_log_warn(...) sluice_log(SLUICE_WARN, __VA_ARGS__)
#define sluice_log_error(...) sluice_log(SLUICE_ERROR, __VA_ARGS__)

#ifdef __cplusplus
}
#endif

#endif /* SLUICE_H */
