/*
 * Sluice's C guest SDK (see sluice.h): the `run` export of world `task-c` (wit/guests.wit) on top
 * of the bindings that `wit-bindgen c` generates for it (task_c.h), a small JSON parser and
 * writer, results, context, logging, and granted variables and secrets. Outbound HTTP is
 * sluice_http.c.
 */
#include "sluice.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "task_c.h"

/* ---- Memory ------------------------------------------------------------------------------ */

/* Running out of memory traps: the host reports the run's memory limit. */
static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        fprintf(stderr, "sluice: out of memory (allocating %zu bytes)\n", n);
        abort();
    }
    return q;
}

static char *xstrndup(const char *s, size_t len) {
    char *d = xrealloc(NULL, len + 1);
    memcpy(d, s, len);
    d[len] = '\0';
    return d;
}

/* ---- JSON values ------------------------------------------------------------------------- */

struct sluice_json {
    sluice_json_type type;
    union {
        bool boolean;
        struct {
            double value;
            int64_t integer;
            bool is_integer;
        } number;
        struct {
            char *bytes;
            size_t len;
        } string;
        struct {
            sluice_json **items;
            char **keys; /* objects only */
            size_t len;
            size_t cap;
        } list;
    } u;
};

typedef struct parser {
    const char *p;
    const char *end;
    const char *error;
    int depth;
} parser;

#define MAX_DEPTH 512

static void skip_ws(parser *ps) {
    while (ps->p < ps->end &&
           (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
        ps->p++;
}

static sluice_json *new_value(sluice_json_type type) {
    sluice_json *v = xrealloc(NULL, sizeof *v);
    memset(v, 0, sizeof *v);
    v->type = type;
    return v;
}

static bool literal(parser *ps, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, word, n) != 0) {
        ps->error = "invalid literal";
        return false;
    }
    ps->p += n;
    return true;
}

static int hex4(const char *p) {
    int v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= c - '0';
        else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
        else return -1;
    }
    return v;
}

static void put_utf8(sluice_buf *b, uint32_t cp) {
    char out[4];
    size_t n;
    if (cp < 0x80) {
        out[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        out[0] = (char)(0xF0 | (cp >> 18));
        out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    sluice_buf_append(b, out, n);
}

/* Parses a string starting at the opening quote into `out` (NUL-terminated). */
static bool parse_string_into(parser *ps, sluice_buf *out) {
    ps->p++; /* the opening quote */
    for (;;) {
        if (ps->p >= ps->end) {
            ps->error = "unterminated string";
            return false;
        }
        unsigned char c = (unsigned char)*ps->p;
        if (c == '"') {
            ps->p++;
            break;
        }
        if (c < 0x20) {
            ps->error = "control character in a string";
            return false;
        }
        if (c != '\\') {
            const char *start = ps->p;
            while (ps->p < ps->end && *ps->p != '"' && *ps->p != '\\' &&
                   (unsigned char)*ps->p >= 0x20)
                ps->p++;
            sluice_buf_append(out, start, (size_t)(ps->p - start));
            continue;
        }
        if (ps->end - ps->p < 2) {
            ps->error = "unterminated escape";
            return false;
        }
        char e = ps->p[1];
        ps->p += 2;
        switch (e) {
        case '"': sluice_buf_append(out, "\"", 1); break;
        case '\\': sluice_buf_append(out, "\\", 1); break;
        case '/': sluice_buf_append(out, "/", 1); break;
        case 'b': sluice_buf_append(out, "\b", 1); break;
        case 'f': sluice_buf_append(out, "\f", 1); break;
        case 'n': sluice_buf_append(out, "\n", 1); break;
        case 'r': sluice_buf_append(out, "\r", 1); break;
        case 't': sluice_buf_append(out, "\t", 1); break;
        case 'u': {
            int hi = ps->end - ps->p >= 4 ? hex4(ps->p) : -1;
            if (hi < 0) {
                ps->error = "invalid \\u escape";
                return false;
            }
            ps->p += 4;
            uint32_t cp = (uint32_t)hi;
            if (hi >= 0xD800 && hi <= 0xDBFF) {
                int lo = ps->end - ps->p >= 6 && ps->p[0] == '\\' && ps->p[1] == 'u'
                             ? hex4(ps->p + 2)
                             : -1;
                if (lo >= 0xDC00 && lo <= 0xDFFF) {
                    ps->p += 6;
                    cp = 0x10000 + (((uint32_t)hi - 0xD800) << 10) + ((uint32_t)lo - 0xDC00);
                } else {
                    cp = 0xFFFD; /* a lone surrogate */
                }
            } else if (hi >= 0xDC00 && hi <= 0xDFFF) {
                cp = 0xFFFD;
            }
            put_utf8(out, cp);
            break;
        }
        default:
            ps->error = "invalid escape";
            return false;
        }
    }
    sluice_buf_append(out, "", 0); /* ensure a buffer */
    out->data[out->len] = '\0';
    return true;
}

static sluice_json *parse_value(parser *ps);

static bool is_digit(char c) { return c >= '0' && c <= '9'; }

static sluice_json *parse_number(parser *ps) {
    const char *start = ps->p;
    bool integer = true;
    if (ps->p < ps->end && *ps->p == '-') ps->p++;
    if (ps->p < ps->end && *ps->p == '0') {
        ps->p++;
    } else if (ps->p < ps->end && *ps->p >= '1' && *ps->p <= '9') {
        while (ps->p < ps->end && is_digit(*ps->p)) ps->p++;
    } else {
        ps->error = "invalid number";
        return NULL;
    }
    if (ps->p < ps->end && *ps->p == '.') {
        integer = false;
        ps->p++;
        if (ps->p >= ps->end || !is_digit(*ps->p)) {
            ps->error = "invalid number";
            return NULL;
        }
        while (ps->p < ps->end && is_digit(*ps->p)) ps->p++;
    }
    if (ps->p < ps->end && (*ps->p == 'e' || *ps->p == 'E')) {
        integer = false;
        ps->p++;
        if (ps->p < ps->end && (*ps->p == '+' || *ps->p == '-')) ps->p++;
        if (ps->p >= ps->end || !is_digit(*ps->p)) {
            ps->error = "invalid number";
            return NULL;
        }
        while (ps->p < ps->end && is_digit(*ps->p)) ps->p++;
    }
    char tmp[64];
    size_t n = (size_t)(ps->p - start);
    char *text = n < sizeof tmp ? tmp : xrealloc(NULL, n + 1);
    memcpy(text, start, n);
    text[n] = '\0';
    sluice_json *v = new_value(SLUICE_JSON_NUMBER);
    v->u.number.value = strtod(text, NULL);
    if (integer) {
        errno = 0;
        long long i = strtoll(text, NULL, 10);
        if (errno == 0) {
            v->u.number.integer = (int64_t)i;
            v->u.number.is_integer = true;
        }
    }
    if (text != tmp) free(text);
    return v;
}

static void list_push(sluice_json *v, char *key, sluice_json *item) {
    if (v->u.list.len == v->u.list.cap) {
        size_t cap = v->u.list.cap ? v->u.list.cap * 2 : 4;
        v->u.list.items = xrealloc(v->u.list.items, cap * sizeof *v->u.list.items);
        if (v->type == SLUICE_JSON_OBJECT)
            v->u.list.keys = xrealloc(v->u.list.keys, cap * sizeof *v->u.list.keys);
        v->u.list.cap = cap;
    }
    if (v->type == SLUICE_JSON_OBJECT) v->u.list.keys[v->u.list.len] = key;
    v->u.list.items[v->u.list.len++] = item;
}

static sluice_json *parse_list(parser *ps, bool object) {
    if (++ps->depth > MAX_DEPTH) {
        ps->error = "nesting too deep";
        return NULL;
    }
    char close = object ? '}' : ']';
    sluice_json *v = new_value(object ? SLUICE_JSON_OBJECT : SLUICE_JSON_ARRAY);
    ps->p++;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == close) {
        ps->p++;
        ps->depth--;
        return v;
    }
    for (;;) {
        char *key = NULL;
        skip_ws(ps);
        if (object) {
            if (ps->p >= ps->end || *ps->p != '"') {
                ps->error = "expected a string key";
                goto fail;
            }
            sluice_buf k = {0};
            if (!parse_string_into(ps, &k)) {
                sluice_buf_free(&k);
                goto fail;
            }
            key = k.data;
            skip_ws(ps);
            if (ps->p >= ps->end || *ps->p != ':') {
                free(key);
                ps->error = "expected ':'";
                goto fail;
            }
            ps->p++;
        }
        sluice_json *item = parse_value(ps);
        if (!item) {
            free(key);
            goto fail;
        }
        list_push(v, key, item);
        skip_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') {
            ps->p++;
            continue;
        }
        if (ps->p < ps->end && *ps->p == close) {
            ps->p++;
            break;
        }
        ps->error = object ? "expected ',' or '}'" : "expected ',' or ']'";
        goto fail;
    }
    ps->depth--;
    return v;
fail:
    sluice_json_free(v);
    return NULL;
}

static sluice_json *parse_value(parser *ps) {
    skip_ws(ps);
    if (ps->p >= ps->end) {
        ps->error = "unexpected end of input";
        return NULL;
    }
    switch (*ps->p) {
    case 'n':
        return literal(ps, "null") ? new_value(SLUICE_JSON_NULL) : NULL;
    case 't':
    case 'f': {
        bool t = *ps->p == 't';
        if (!literal(ps, t ? "true" : "false")) return NULL;
        sluice_json *v = new_value(SLUICE_JSON_BOOL);
        v->u.boolean = t;
        return v;
    }
    case '"': {
        sluice_buf s = {0};
        if (!parse_string_into(ps, &s)) {
            sluice_buf_free(&s);
            return NULL;
        }
        sluice_json *v = new_value(SLUICE_JSON_STRING);
        v->u.string.bytes = s.data;
        v->u.string.len = s.len;
        return v;
    }
    case '[':
        return parse_list(ps, false);
    case '{':
        return parse_list(ps, true);
    default:
        return parse_number(ps);
    }
}

sluice_json *sluice_json_parse(const char *text, size_t len, const char **error) {
    parser ps = {text, text + len, NULL, 0};
    sluice_json *v = parse_value(&ps);
    if (v) {
        skip_ws(&ps);
        if (ps.p != ps.end) {
            ps.error = "trailing characters after the value";
            sluice_json_free(v);
            v = NULL;
        }
    }
    if (!v && error) *error = ps.error ? ps.error : "invalid JSON";
    return v;
}

void sluice_json_free(sluice_json *v) {
    if (!v) return;
    if (v->type == SLUICE_JSON_STRING) {
        free(v->u.string.bytes);
    } else if (v->type == SLUICE_JSON_ARRAY || v->type == SLUICE_JSON_OBJECT) {
        for (size_t i = 0; i < v->u.list.len; i++) {
            sluice_json_free(v->u.list.items[i]);
            if (v->u.list.keys) free(v->u.list.keys[i]);
        }
        free(v->u.list.items);
        free(v->u.list.keys);
    }
    free(v);
}

sluice_json_type sluice_json_typeof(const sluice_json *v) { return v ? v->type : SLUICE_JSON_NULL; }
bool sluice_json_is_null(const sluice_json *v) { return !v || v->type == SLUICE_JSON_NULL; }
bool sluice_json_is_bool(const sluice_json *v) { return v && v->type == SLUICE_JSON_BOOL; }
bool sluice_json_is_number(const sluice_json *v) { return v && v->type == SLUICE_JSON_NUMBER; }
bool sluice_json_is_integer(const sluice_json *v) {
    return sluice_json_is_number(v) && v->u.number.is_integer;
}
bool sluice_json_is_string(const sluice_json *v) { return v && v->type == SLUICE_JSON_STRING; }
bool sluice_json_is_array(const sluice_json *v) { return v && v->type == SLUICE_JSON_ARRAY; }
bool sluice_json_is_object(const sluice_json *v) { return v && v->type == SLUICE_JSON_OBJECT; }

bool sluice_json_bool(const sluice_json *v) { return sluice_json_is_bool(v) && v->u.boolean; }
double sluice_json_number(const sluice_json *v) {
    return sluice_json_is_number(v) ? v->u.number.value : 0;
}
int64_t sluice_json_int(const sluice_json *v) {
    if (!sluice_json_is_number(v)) return 0;
    return v->u.number.is_integer ? v->u.number.integer : (int64_t)v->u.number.value;
}
const char *sluice_json_string(const sluice_json *v) {
    return sluice_json_is_string(v) ? v->u.string.bytes : NULL;
}
size_t sluice_json_string_len(const sluice_json *v) {
    return sluice_json_is_string(v) ? v->u.string.len : 0;
}
size_t sluice_json_len(const sluice_json *v) {
    return sluice_json_is_array(v) || sluice_json_is_object(v) ? v->u.list.len : 0;
}
const sluice_json *sluice_json_at(const sluice_json *v, size_t i) {
    return i < sluice_json_len(v) ? v->u.list.items[i] : NULL;
}
const char *sluice_json_key_at(const sluice_json *v, size_t i) {
    return sluice_json_is_object(v) && i < v->u.list.len ? v->u.list.keys[i] : NULL;
}
const sluice_json *sluice_json_get(const sluice_json *v, const char *key) {
    if (!sluice_json_is_object(v)) return NULL;
    for (size_t i = v->u.list.len; i-- > 0;)
        if (strcmp(v->u.list.keys[i], key) == 0) return v->u.list.items[i];
    return NULL;
}

/* ---- Buffers and JSON text --------------------------------------------------------------- */

static void reserve(sluice_buf *b, size_t extra) {
    size_t need = b->len + extra + 1; /* room for a NUL */
    if (need <= b->cap) return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need) cap *= 2;
    b->data = xrealloc(b->data, cap);
    b->cap = cap;
}

void sluice_buf_append(sluice_buf *b, const char *bytes, size_t len) {
    reserve(b, len);
    if (len) memcpy(b->data + b->len, bytes, len);
    b->len += len;
    b->data[b->len] = '\0';
}

void sluice_buf_puts(sluice_buf *b, const char *s) { sluice_buf_append(b, s, strlen(s)); }

static void buf_vprintf(sluice_buf *b, const char *fmt, va_list ap) {
    va_list copy;
    va_copy(copy, ap);
    int n = vsnprintf(NULL, 0, fmt, copy);
    va_end(copy);
    if (n < 0) return;
    reserve(b, (size_t)n);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    b->len += (size_t)n;
}

void sluice_buf_printf(sluice_buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    buf_vprintf(b, fmt, ap);
    va_end(ap);
}

void sluice_buf_json_string(sluice_buf *b, const char *s, size_t len) {
    static const char hex[] = "0123456789abcdef";
    sluice_buf_append(b, "\"", 1);
    size_t run = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *esc = NULL;
        char u[7];
        switch (c) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        default:
            if (c < 0x20) {
                u[0] = '\\', u[1] = 'u', u[2] = '0', u[3] = '0';
                u[4] = hex[c >> 4], u[5] = hex[c & 15], u[6] = '\0';
                esc = u;
            }
        }
        if (!esc) continue;
        sluice_buf_append(b, s + run, i - run);
        sluice_buf_puts(b, esc);
        run = i + 1;
    }
    sluice_buf_append(b, s + run, len - run);
    sluice_buf_append(b, "\"", 1);
}

void sluice_buf_json_number(sluice_buf *b, double x) {
    if (!isfinite(x)) {
        sluice_buf_puts(b, "null");
        return;
    }
    if (x == floor(x) && fabs(x) < 9007199254740992.0) {
        sluice_buf_printf(b, "%lld", (long long)x);
        return;
    }
    /* The shortest of %.15g..%.17g that reads back exactly. */
    char tmp[40];
    for (int precision = 15; precision <= 17; precision++) {
        snprintf(tmp, sizeof tmp, "%.*g", precision, x);
        if (strtod(tmp, NULL) == x) break;
    }
    sluice_buf_puts(b, tmp);
}

void sluice_buf_json(sluice_buf *b, const sluice_json *v) {
    switch (sluice_json_typeof(v)) {
    case SLUICE_JSON_NULL: sluice_buf_puts(b, "null"); break;
    case SLUICE_JSON_BOOL: sluice_buf_puts(b, v->u.boolean ? "true" : "false"); break;
    case SLUICE_JSON_NUMBER:
        if (v->u.number.is_integer) sluice_buf_printf(b, "%lld", (long long)v->u.number.integer);
        else sluice_buf_json_number(b, v->u.number.value);
        break;
    case SLUICE_JSON_STRING: sluice_buf_json_string(b, v->u.string.bytes, v->u.string.len); break;
    case SLUICE_JSON_ARRAY:
    case SLUICE_JSON_OBJECT: {
        bool object = v->type == SLUICE_JSON_OBJECT;
        sluice_buf_puts(b, object ? "{" : "[");
        for (size_t i = 0; i < v->u.list.len; i++) {
            if (i) sluice_buf_puts(b, ",");
            if (object) {
                sluice_buf_json_string(b, v->u.list.keys[i], strlen(v->u.list.keys[i]));
                sluice_buf_puts(b, ":");
            }
            sluice_buf_json(b, v->u.list.items[i]);
        }
        sluice_buf_puts(b, object ? "}" : "]");
        break;
    }
    }
}

void sluice_buf_free(sluice_buf *b) {
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* ---- Results ----------------------------------------------------------------------------- */

static char *vformat(const char *fmt, va_list ap) {
    sluice_buf b = {0};
    buf_vprintf(&b, fmt, ap);
    sluice_buf_append(&b, "", 0);
    return b.data;
}

static sluice_result signal(sluice_result_kind kind, const char *fmt, va_list ap) {
    sluice_result r = {kind, NULL, 0, vformat(fmt, ap), -1};
    return r;
}

sluice_result sluice_ok(const char *json) {
    size_t len = strlen(json);
    sluice_result r = {SLUICE_OK, xstrndup(json, len), len, NULL, -1};
    return r;
}

sluice_result sluice_ok_fmt(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *json = vformat(fmt, ap);
    va_end(ap);
    sluice_result r = {SLUICE_OK, json, strlen(json), NULL, -1};
    return r;
}

sluice_result sluice_ok_buf(sluice_buf *json) {
    sluice_buf_append(json, "", 0);
    sluice_result r = {SLUICE_OK, json->data, json->len, NULL, -1};
    json->data = NULL;
    json->len = json->cap = 0;
    return r;
}

#define SIGNAL_FN(name, kind)                                                                  \
    sluice_result name(const char *fmt, ...) {                                                 \
        va_list ap;                                                                            \
        va_start(ap, fmt);                                                                     \
        sluice_result r = signal(kind, fmt, ap);                                               \
        va_end(ap);                                                                            \
        return r;                                                                              \
    }
SIGNAL_FN(sluice_fail, SLUICE_FAIL)
SIGNAL_FN(sluice_skip, SLUICE_SKIP)
SIGNAL_FN(sluice_pause, SLUICE_PAUSE)

sluice_result sluice_retry(int64_t delay_ms, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    sluice_result r = signal(SLUICE_RETRY, fmt, ap);
    va_end(ap);
    r.delay_ms = delay_ms;
    return r;
}

sluice_result sluice_success(const char *output_json, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    sluice_result r = signal(SLUICE_SUCCESS, fmt, ap);
    va_end(ap);
    if (output_json) {
        r.output_len = strlen(output_json);
        r.output = xstrndup(output_json, r.output_len);
    }
    return r;
}

/* ---- Context and logging ----------------------------------------------------------------- */

/* A string the host handed over (owned by us) as a malloc'd C string. */
static char *owned(task_c_string_t *s) {
    char *c = xstrndup((const char *)s->ptr, s->len);
    task_c_string_free(s);
    return c;
}

char *sluice_context_get(const char *key) {
    task_c_string_t k = {(uint8_t *)key, strlen(key)};
    task_c_string_t v;
    if (!sluice_task_context_get(&k, &v)) return NULL;
    return owned(&v);
}

char *sluice_flow_run_id(void) {
    task_c_string_t s;
    sluice_task_context_flow_run_id(&s);
    return owned(&s);
}

char *sluice_task_run_id(void) {
    task_c_string_t s;
    sluice_task_context_task_run_id(&s);
    return owned(&s);
}

char *sluice_task_name(void) {
    task_c_string_t s;
    sluice_task_context_task_name(&s);
    return owned(&s);
}

char *sluice_parameters(void) {
    task_c_string_t s;
    sluice_task_context_parameters(&s);
    return owned(&s);
}

uint32_t sluice_attempt(void) { return sluice_task_context_attempt(); }

bool sluice_map_index(uint32_t *index) {
    uint32_t i = 0;
    bool some = sluice_task_context_map_index(&i);
    if (some && index) *index = i;
    return some;
}

void sluice_vlog(sluice_log_level level, const char *fmt, va_list ap) {
    char *text = vformat(fmt, ap);
    task_c_string_t message = {(uint8_t *)text, strlen(text)};
    sluice_task_log_log((sluice_task_log_level_t)level, &message);
    free(text);
}

void sluice_log(sluice_log_level level, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    sluice_vlog(level, fmt, ap);
    va_end(ap);
}

/* ---- Granted variables and secrets ------------------------------------------------------- */

/* Both are environment variables of the component: the host sets exactly the granted ones. */
const char *sluice_env(const char *name) { return name ? getenv(name) : NULL; }

const char *sluice_secret(const char *name) { return name ? getenv(name) : NULL; }

/* ---- The export -------------------------------------------------------------------------- */

static const char *current_input = "";

const char *sluice_input_text(void) { return current_input; }

/* Hand a malloc'd string to the bindings (which free non-empty ones after the call). */
static task_c_string_t give(char *s, size_t len) {
    if (len == 0) {
        free(s);
        return (task_c_string_t){NULL, 0};
    }
    return (task_c_string_t){(uint8_t *)s, len};
}

static task_c_string_t give_str(char *s) { return give(s, s ? strlen(s) : 0); }

bool exports_task_c_run(task_c_json_t *input, task_c_json_t *ret, task_c_signal_t *err) {
    /* A reactor has no exit to flush stdio: make stdout line-buffered so prints are kept. */
    static bool stdio_ready = false;
    if (!stdio_ready) {
        setvbuf(stdout, NULL, _IOLBF, 0);
        stdio_ready = true;
    }
    char *text = owned(input);
    current_input = text;
    const char *error = NULL;
    sluice_json *value = sluice_json_parse(text, strlen(text), &error);
    sluice_result r;
    if (value) {
        r = run(value);
        sluice_json_free(value);
    } else {
        r = sluice_fail("the task's input is not JSON: %s", error);
    }
    current_input = "";
    free(text);
    fflush(stdout);
    fflush(stderr);

    switch (r.kind) {
    case SLUICE_OK:
        if (!r.output) {
            r.output = xstrndup("null", 4);
            r.output_len = 4;
        }
        *ret = give(r.output, r.output_len);
        free(r.message);
        return true;
    case SLUICE_FAIL:
        err->tag = SLUICE_TASK_TYPES_SIGNAL_FAIL;
        err->val.fail = give_str(r.message);
        break;
    case SLUICE_SKIP:
        err->tag = SLUICE_TASK_TYPES_SIGNAL_SKIP;
        err->val.skip = give_str(r.message);
        break;
    case SLUICE_PAUSE:
        err->tag = SLUICE_TASK_TYPES_SIGNAL_PAUSE;
        err->val.pause = give_str(r.message);
        break;
    case SLUICE_RETRY:
        err->tag = SLUICE_TASK_TYPES_SIGNAL_RETRY;
        err->val.retry.message = give_str(r.message);
        err->val.retry.delay_ms.is_some = r.delay_ms >= 0;
        err->val.retry.delay_ms.val = r.delay_ms >= 0 ? (uint64_t)r.delay_ms : 0;
        break;
    case SLUICE_SUCCESS:
        err->tag = SLUICE_TASK_TYPES_SIGNAL_SUCCESS;
        err->val.success.message = give_str(r.message);
        err->val.success.output.is_some = r.output != NULL;
        if (r.output) err->val.success.output.val = give(r.output, r.output_len);
        break;
    default:
        err->tag = SLUICE_TASK_TYPES_SIGNAL_FAIL;
        err->val.fail = give_str(xstrndup("the task returned an invalid sluice_result", 41));
        free(r.output);
        free(r.message);
        break;
    }
    if (r.kind != SLUICE_SUCCESS) free(r.output);
    return false;
}
