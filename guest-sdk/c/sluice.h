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
 * Build with `guest-sdk/c/build <task.c or directory> <out.wasm>`. The contract is wit/task.wit
 * (world `task`).
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
