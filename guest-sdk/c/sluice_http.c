/*
 * Sluice's C guest SDK, outbound HTTP (see sluice.h, "HTTP"): sluice_http_request and its
 * shorthands on top of the wasi:http@0.2.12 bindings that `wit-bindgen c` generates for world
 * `task-c` (task_c.h), the split of a URL into scheme, authority and path, and the names of the
 * errors. No HTTP is spoken here: the host's wasi:http implementation does that, under the task's
 * `http` grants.
 */
#include "sluice.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "task_c.h"

#define WRITE_CHUNK 4096 /* the most blocking-write-and-flush takes in one call */
#define READ_CHUNK 65536

_Static_assert(SLUICE_HTTP_ERR_DNS_TIMEOUT == 1 + WASI_HTTP_TYPES_ERROR_CODE_DNS_TIMEOUT,
               "sluice_http_error follows wasi:http's error-code");
_Static_assert(SLUICE_HTTP_ERR_HTTP_REQUEST_DENIED ==
                   1 + WASI_HTTP_TYPES_ERROR_CODE_HTTP_REQUEST_DENIED,
               "sluice_http_error follows wasi:http's error-code");
_Static_assert(SLUICE_HTTP_ERR_INTERNAL_ERROR == 1 + WASI_HTTP_TYPES_ERROR_CODE_INTERNAL_ERROR,
               "sluice_http_error follows wasi:http's error-code");

/* ---- Error names ------------------------------------------------------------------------- */

/* wasi:http's error-code cases in order, named like the Python SDK's HTTPError.code. */
static const char *const WASI_NAMES[] = {
    "DnsTimeout",
    "DnsError",
    "DestinationNotFound",
    "DestinationUnavailable",
    "DestinationIpProhibited",
    "DestinationIpUnroutable",
    "ConnectionRefused",
    "ConnectionTerminated",
    "ConnectionTimeout",
    "ConnectionReadTimeout",
    "ConnectionWriteTimeout",
    "ConnectionLimitReached",
    "TlsProtocolError",
    "TlsCertificateError",
    "TlsAlertReceived",
    "HttpRequestDenied",
    "HttpRequestLengthRequired",
    "HttpRequestBodySize",
    "HttpRequestMethodInvalid",
    "HttpRequestUriInvalid",
    "HttpRequestUriTooLong",
    "HttpRequestHeaderSectionSize",
    "HttpRequestHeaderSize",
    "HttpRequestTrailerSectionSize",
    "HttpRequestTrailerSize",
    "HttpResponseIncomplete",
    "HttpResponseHeaderSectionSize",
    "HttpResponseHeaderSize",
    "HttpResponseBodySize",
    "HttpResponseTrailerSectionSize",
    "HttpResponseTrailerSize",
    "HttpResponseTransferCoding",
    "HttpResponseContentCoding",
    "HttpResponseTimeout",
    "HttpUpgradeFailed",
    "HttpProtocolError",
    "LoopDetected",
    "ConfigurationError",
    "InternalError",
};
_Static_assert(sizeof WASI_NAMES / sizeof *WASI_NAMES == SLUICE_HTTP_ERR_INTERNAL_ERROR,
               "a name for every wasi:http error-code case");

/* The SDK's own, from SLUICE_HTTP_ERR_INVALID_URL on. */
static const char *const SDK_NAMES[] = {
    "InvalidUrl", "InvalidHeader", "InvalidMethod", "InvalidArgument",
    "Status",     "InvalidJson",   "Stream",        "OutOfMemory",
};
_Static_assert(sizeof SDK_NAMES / sizeof *SDK_NAMES ==
                   SLUICE_HTTP_ERR_OUT_OF_MEMORY - SLUICE_HTTP_ERR_INVALID_URL + 1,
               "a name for every SDK error");

const char *sluice_http_error_name(int err) {
    if (err == SLUICE_HTTP_OK) return "Ok";
    if (err >= 1 && err <= SLUICE_HTTP_ERR_INTERNAL_ERROR) return WASI_NAMES[err - 1];
    if (err >= SLUICE_HTTP_ERR_INVALID_URL && err <= SLUICE_HTTP_ERR_OUT_OF_MEMORY)
        return SDK_NAMES[err - SLUICE_HTTP_ERR_INVALID_URL];
    return "Unknown";
}

/* The SDK's number for a wasi:http error code, which is freed. */
static int from_code(wasi_http_types_error_code_t *code) {
    int err = 1 + (int)code->tag;
    wasi_http_types_error_code_free(code);
    return err;
}

/* The error behind a failed stream operation (the stream error is freed): the wasi:http code the
 * host attached (how the run's response-bytes limit surfaces), else SLUICE_HTTP_ERR_STREAM. */
static int from_stream_error(wasi_io_streams_stream_error_t *e) {
    int err = SLUICE_HTTP_ERR_STREAM;
    wasi_http_types_error_code_t code;
    if (e->tag == WASI_IO_STREAMS_STREAM_ERROR_LAST_OPERATION_FAILED &&
        wasi_http_types_http_error_code(wasi_io_error_borrow_error(e->val.last_operation_failed),
                                        &code))
        err = from_code(&code);
    wasi_io_streams_stream_error_free(e);
    return err;
}

/* ---- URLs -------------------------------------------------------------------------------- */

typedef struct url_parts {
    bool https;
    const char *authority; /* host[:port], without user info */
    size_t authority_len;
    char *path; /* path and query, starting with '/' (malloc'd) */
} url_parts;

static bool prefix_nocase(const char *s, const char *prefix) {
    return strncasecmp(s, prefix, strlen(prefix)) == 0;
}

/* Split an http(s) URL; the error is SLUICE_HTTP_ERR_INVALID_URL or _OUT_OF_MEMORY. */
static int split_url(const char *url, url_parts *u) {
    for (const char *c = url; *c; c++)
        if ((unsigned char)*c <= 0x20 || *c == 0x7f) return SLUICE_HTTP_ERR_INVALID_URL;
    const char *rest;
    if (prefix_nocase(url, "http://")) {
        u->https = false;
        rest = url + 7;
    } else if (prefix_nocase(url, "https://")) {
        u->https = true;
        rest = url + 8;
    } else {
        return SLUICE_HTTP_ERR_INVALID_URL;
    }
    size_t auth_len = strcspn(rest, "/?#");
    const char *at = NULL;
    for (size_t i = 0; i < auth_len; i++)
        if (rest[i] == '@') at = rest + i;
    u->authority = at ? at + 1 : rest;
    u->authority_len = auth_len - (size_t)(u->authority - rest);
    if (u->authority_len == 0 || u->authority[0] == ':') return SLUICE_HTTP_ERR_INVALID_URL;
    const char *path = rest + auth_len;
    size_t path_len = strcspn(path, "#");
    bool slash = path_len == 0 || path[0] != '/';
    u->path = malloc(path_len + 2);
    if (!u->path) return SLUICE_HTTP_ERR_OUT_OF_MEMORY;
    if (slash) u->path[0] = '/';
    memcpy(u->path + slash, path, path_len);
    u->path[path_len + slash] = '\0';
    return 0;
}

/* ---- The request ------------------------------------------------------------------------- */

static task_c_string_t str(const char *s, size_t len) {
    return (task_c_string_t){(uint8_t *)s, len};
}

/* The request's fields: `headers` (name, value, ..., NULL) and a content-length for a body. */
static int new_fields(const char *const *headers, bool has_body, size_t body_len,
                      wasi_http_types_own_fields_t *fields) {
    size_t n = 0;
    bool has_length = false;
    while (headers && headers[n]) {
        if (n % 2 == 0 && strcasecmp(headers[n], "content-length") == 0) has_length = true;
        n++;
    }
    if (n % 2) return SLUICE_HTTP_ERR_INVALID_HEADER; /* a name without a value */
    wasi_http_types_tuple2_field_name_field_value_t *kv = malloc((n / 2 + 1) * sizeof *kv);
    if (!kv) return SLUICE_HTTP_ERR_OUT_OF_MEMORY;
    size_t k = 0;
    for (size_t i = 0; i < n; i += 2, k++) {
        kv[k].f0 = str(headers[i], strlen(headers[i]));
        kv[k].f1 = (wasi_http_types_field_value_t){(uint8_t *)headers[i + 1],
                                                   strlen(headers[i + 1])};
    }
    /* Without a length the host sends the body chunked, which some servers cannot read. */
    char length[24];
    if (has_body && !has_length) {
        int len = snprintf(length, sizeof length, "%zu", body_len);
        kv[k].f0 = str("content-length", 14);
        kv[k].f1 = (wasi_http_types_field_value_t){(uint8_t *)length, (size_t)len};
        k++;
    }
    wasi_http_types_list_tuple2_field_name_field_value_t list = {kv, k};
    wasi_http_types_header_error_t herr;
    bool ok = wasi_http_types_static_fields_from_list(&list, fields, &herr);
    free(kv);
    if (!ok) {
        wasi_http_types_header_error_free(&herr);
        return SLUICE_HTTP_ERR_INVALID_HEADER;
    }
    return 0;
}

static const struct {
    const char *name;
    uint8_t tag;
} METHODS[] = {
    {"GET", WASI_HTTP_TYPES_METHOD_GET},         {"HEAD", WASI_HTTP_TYPES_METHOD_HEAD},
    {"POST", WASI_HTTP_TYPES_METHOD_POST},       {"PUT", WASI_HTTP_TYPES_METHOD_PUT},
    {"DELETE", WASI_HTTP_TYPES_METHOD_DELETE},   {"CONNECT", WASI_HTTP_TYPES_METHOD_CONNECT},
    {"OPTIONS", WASI_HTTP_TYPES_METHOD_OPTIONS}, {"TRACE", WASI_HTTP_TYPES_METHOD_TRACE},
    {"PATCH", WASI_HTTP_TYPES_METHOD_PATCH},
};

/* An outgoing request with its method, scheme, authority, path and fields. */
static int new_request(const char *method, const url_parts *u, const char *const *headers,
                       bool has_body, size_t body_len,
                       wasi_http_types_own_outgoing_request_t *out) {
    if (!*method) return SLUICE_HTTP_ERR_INVALID_METHOD;
    wasi_http_types_own_fields_t fields;
    int err = new_fields(headers, has_body, body_len, &fields);
    if (err) return err;
    wasi_http_types_own_outgoing_request_t req =
        wasi_http_types_constructor_outgoing_request(fields);
    wasi_http_types_borrow_outgoing_request_t r = wasi_http_types_borrow_outgoing_request(req);
    wasi_http_types_method_t m = {.tag = WASI_HTTP_TYPES_METHOD_OTHER};
    m.val.other = str(method, strlen(method));
    for (size_t i = 0; i < sizeof METHODS / sizeof *METHODS; i++)
        if (strcmp(method, METHODS[i].name) == 0) m.tag = METHODS[i].tag;
    wasi_http_types_scheme_t scheme = {
        .tag = u->https ? WASI_HTTP_TYPES_SCHEME_HTTPS : WASI_HTTP_TYPES_SCHEME_HTTP};
    task_c_string_t authority = str(u->authority, u->authority_len);
    task_c_string_t path = str(u->path, strlen(u->path));
    if (!wasi_http_types_method_outgoing_request_set_method(r, &m))
        err = SLUICE_HTTP_ERR_INVALID_METHOD;
    else if (!wasi_http_types_method_outgoing_request_set_scheme(r, &scheme) ||
             !wasi_http_types_method_outgoing_request_set_authority(r, &authority) ||
             !wasi_http_types_method_outgoing_request_set_path_with_query(r, &path))
        err = SLUICE_HTTP_ERR_INVALID_URL;
    if (err) {
        wasi_http_types_outgoing_request_drop_own(req);
        return err;
    }
    *out = req;
    return 0;
}

/* Write the body (if any) and finish it; takes `obody`. On a failure the body is dropped
 * unfinished, which aborts the request. */
static int send_body(wasi_http_types_own_outgoing_body_t obody, const uint8_t *body, size_t len) {
    int err = 0;
    if (len) {
        wasi_http_types_own_output_stream_t os;
        if (!wasi_http_types_method_outgoing_body_write(wasi_http_types_borrow_outgoing_body(obody),
                                                        &os)) {
            wasi_http_types_outgoing_body_drop_own(obody);
            return SLUICE_HTTP_ERR_INTERNAL_ERROR;
        }
        for (size_t off = 0; off < len; off += WRITE_CHUNK) {
            task_c_list_u8_t chunk = {(uint8_t *)body + off,
                                      len - off < WRITE_CHUNK ? len - off : WRITE_CHUNK};
            wasi_io_streams_stream_error_t serr;
            if (!wasi_io_streams_method_output_stream_blocking_write_and_flush(
                    wasi_io_streams_borrow_output_stream(os), &chunk, &serr)) {
                err = from_stream_error(&serr);
                break;
            }
        }
        wasi_io_streams_output_stream_drop_own(os); /* before the body, its parent */
    }
    if (err) {
        wasi_http_types_outgoing_body_drop_own(obody);
        return err;
    }
    wasi_http_types_error_code_t code;
    if (!wasi_http_types_static_outgoing_body_finish(obody, NULL, &code)) return from_code(&code);
    return 0;
}

/* Wait for the response head; takes `fut`. */
static int await_response(wasi_http_types_own_future_incoming_response_t fut,
                          wasi_http_types_own_incoming_response_t *resp) {
    wasi_http_types_borrow_future_incoming_response_t f =
        wasi_http_types_borrow_future_incoming_response(fut);
    wasi_http_types_result_result_own_incoming_response_error_code_void_t res;
    while (!wasi_http_types_method_future_incoming_response_get(f, &res)) {
        wasi_io_poll_own_pollable_t ready =
            wasi_http_types_method_future_incoming_response_subscribe(f);
        wasi_io_poll_method_pollable_block(wasi_io_poll_borrow_pollable(ready));
        wasi_io_poll_pollable_drop_own(ready); /* before the future, its parent */
    }
    wasi_http_types_future_incoming_response_drop_own(fut);
    if (res.is_err) return SLUICE_HTTP_ERR_INTERNAL_ERROR; /* taken twice: cannot happen */
    if (res.val.ok.is_err) return from_code(&res.val.ok.val.err);
    *resp = res.val.ok.val.ok;
    return 0;
}

/* Copy the response's header entries into `out` (which sluice_http_response_free cleans up
 * after a failure). */
static int copy_headers(const wasi_http_types_list_tuple2_field_name_field_value_t *entries,
                        sluice_http_response *out) {
    if (entries->len == 0) return 0;
    out->headers = calloc(entries->len, sizeof *out->headers);
    if (!out->headers) return SLUICE_HTTP_ERR_OUT_OF_MEMORY;
    for (size_t i = 0; i < entries->len; i++) {
        const wasi_http_types_tuple2_field_name_field_value_t *e = &entries->ptr[i];
        sluice_http_header *h = &out->headers[out->headers_len];
        h->name = malloc(e->f0.len + 1);
        h->value = malloc(e->f1.len + 1);
        out->headers_len++;
        if (!h->name || !h->value) return SLUICE_HTTP_ERR_OUT_OF_MEMORY;
        memcpy(h->name, e->f0.ptr, e->f0.len);
        h->name[e->f0.len] = '\0';
        memcpy(h->value, e->f1.ptr, e->f1.len);
        h->value[e->f1.len] = '\0';
        h->value_len = e->f1.len;
    }
    return 0;
}

/* Read the whole body into `out`; takes `ibody`. */
static int read_body(wasi_http_types_own_incoming_body_t ibody, sluice_http_response *out) {
    wasi_http_types_own_input_stream_t is;
    if (!wasi_http_types_method_incoming_body_stream(wasi_http_types_borrow_incoming_body(ibody),
                                                     &is)) {
        wasi_http_types_incoming_body_drop_own(ibody);
        return SLUICE_HTTP_ERR_INTERNAL_ERROR;
    }
    uint8_t *data = NULL;
    size_t len = 0, cap = 0;
    int err = 0;
    for (;;) {
        task_c_list_u8_t chunk;
        wasi_io_streams_stream_error_t serr;
        if (!wasi_io_streams_method_input_stream_blocking_read(
                wasi_io_streams_borrow_input_stream(is), READ_CHUNK, &chunk, &serr)) {
            if (serr.tag == WASI_IO_STREAMS_STREAM_ERROR_CLOSED) break; /* the end */
            err = from_stream_error(&serr);
            break;
        }
        if (chunk.len >= SIZE_MAX - len) {
            err = SLUICE_HTTP_ERR_OUT_OF_MEMORY;
        } else if (len + chunk.len + 1 > cap) {
            size_t want = cap ? cap : READ_CHUNK;
            while (want < len + chunk.len + 1) want = want > SIZE_MAX / 2 ? SIZE_MAX : want * 2;
            uint8_t *grown = realloc(data, want);
            if (grown) {
                data = grown;
                cap = want;
            } else {
                err = SLUICE_HTTP_ERR_OUT_OF_MEMORY;
            }
        }
        if (!err && chunk.len) {
            memcpy(data + len, chunk.ptr, chunk.len);
            len += chunk.len;
        }
        task_c_list_u8_free(&chunk);
        if (err) break;
    }
    wasi_io_streams_input_stream_drop_own(is); /* before the body, its parent */
    if (!err && !data && !(data = malloc(1))) err = SLUICE_HTTP_ERR_OUT_OF_MEMORY;
    if (err) {
        free(data);
        wasi_http_types_incoming_body_drop_own(ibody);
        return err;
    }
    wasi_http_types_future_trailers_drop_own(wasi_http_types_static_incoming_body_finish(ibody));
    data[len] = '\0';
    out->body = data;
    out->body_len = len;
    return 0;
}

/* Status, headers and body into `out`; takes `resp`. */
static int read_response(wasi_http_types_own_incoming_response_t resp, sluice_http_response *out) {
    wasi_http_types_borrow_incoming_response_t r = wasi_http_types_borrow_incoming_response(resp);
    out->status = wasi_http_types_method_incoming_response_status(r);
    wasi_http_types_own_headers_t headers = wasi_http_types_method_incoming_response_headers(r);
    wasi_http_types_list_tuple2_field_name_field_value_t entries;
    wasi_http_types_method_fields_entries(wasi_http_types_borrow_fields(headers), &entries);
    wasi_http_types_fields_drop_own(headers); /* before the response, its parent */
    int err = copy_headers(&entries, out);
    wasi_http_types_list_tuple2_field_name_field_value_free(&entries);
    wasi_http_types_own_incoming_body_t ibody;
    if (!err && !wasi_http_types_method_incoming_response_consume(r, &ibody))
        err = SLUICE_HTTP_ERR_INTERNAL_ERROR;
    wasi_http_types_incoming_response_drop_own(resp);
    return err ? err : read_body(ibody, out);
}

int sluice_http_request(const char *method, const char *url, const char *const *headers,
                        const uint8_t *body, size_t body_len, sluice_http_response *out) {
    if (!out) return SLUICE_HTTP_ERR_INVALID_ARGUMENT;
    memset(out, 0, sizeof *out);
    if (!method || !url || (!body && body_len)) return SLUICE_HTTP_ERR_INVALID_ARGUMENT;
    url_parts u;
    int err = split_url(url, &u);
    if (err) return err;
    wasi_http_types_own_outgoing_request_t req;
    err = new_request(method, &u, headers, body != NULL, body_len, &req);
    free(u.path);
    if (err) return err;
    /* The body is taken before `handle` consumes the request, and written after. */
    wasi_http_types_own_outgoing_body_t obody;
    if (!wasi_http_types_method_outgoing_request_body(wasi_http_types_borrow_outgoing_request(req),
                                                      &obody)) {
        wasi_http_types_outgoing_request_drop_own(req);
        return SLUICE_HTTP_ERR_INTERNAL_ERROR;
    }
    wasi_http_types_own_future_incoming_response_t fut;
    wasi_http_types_error_code_t code;
    if (!wasi_http_outgoing_handler_handle(req, NULL, &fut, &code)) {
        wasi_http_types_outgoing_body_drop_own(obody);
        return from_code(&code);
    }
    int write_err = send_body(obody, body, body_len);
    wasi_http_types_own_incoming_response_t resp;
    /* When the body could not be sent, the response's error says why best (e.g. a refused
     * connection), if it has one. */
    err = await_response(fut, &resp);
    if (err) return err;
    if (write_err) {
        wasi_http_types_incoming_response_drop_own(resp);
        return write_err;
    }
    err = read_response(resp, out);
    if (err) sluice_http_response_free(out);
    return err;
}

int sluice_http_get(const char *url, sluice_http_response *out) {
    return sluice_http_request("GET", url, NULL, NULL, 0, out);
}

int sluice_http_get_json(const char *url, sluice_json **out) {
    if (!out) return SLUICE_HTTP_ERR_INVALID_ARGUMENT;
    *out = NULL;
    static const char *const headers[] = {"accept", "application/json", NULL};
    sluice_http_response r;
    int err = sluice_http_request("GET", url, headers, NULL, 0, &r);
    if (err) return err;
    if (r.status < 200 || r.status > 299) {
        err = SLUICE_HTTP_ERR_STATUS;
    } else {
        *out = sluice_json_parse((const char *)r.body, r.body_len, NULL);
        if (!*out) err = SLUICE_HTTP_ERR_INVALID_JSON;
    }
    sluice_http_response_free(&r);
    return err;
}

const char *sluice_http_response_header(const sluice_http_response *r, const char *name) {
    for (size_t i = 0; r && name && i < r->headers_len; i++)
        if (strcasecmp(r->headers[i].name, name) == 0) return r->headers[i].value;
    return NULL;
}

void sluice_http_response_free(sluice_http_response *r) {
    if (!r) return;
    for (size_t i = 0; i < r->headers_len; i++) {
        free(r->headers[i].name);
        free(r->headers[i].value);
    }
    free(r->headers);
    free(r->body);
    memset(r, 0, sizeof *r);
}
