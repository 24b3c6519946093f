/* The `probe` mode of the C test guest (see ../README.md): tries each step with C's idioms for
 * what grants give (stdio, sluice_env/sluice_secret, environ, sluice_http_*, and the raw
 * wasi:sockets bindings for TCP) and reports `{"ok": value}` or `{"err": "text"}` for each. */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sluice.h>

#include "probe.h"
#include "task_c.h"

extern char **environ;

static void put_string_or_null(sluice_buf *b, const char *s) {
    if (s) sluice_buf_json_string(b, s, strlen(s));
    else sluice_buf_puts(b, "null");
}

static const char *arg(const sluice_json *step, const char *key) {
    return sluice_json_string(sluice_json_get(step, key));
}

/* Each step writes its value into `val` and returns NULL, or returns the error's text. */

static const char *read_file(const sluice_json *step, sluice_buf *val) {
    const char *path = arg(step, "path");
    if (!path) return "no \"path\"";
    FILE *f = fopen(path, "rb");
    if (!f) return strerror(errno);
    sluice_buf text = {0};
    char chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) sluice_buf_append(&text, chunk, n);
    int failed = ferror(f), e = errno;
    fclose(f);
    if (!failed) sluice_buf_json_string(val, text.data ? text.data : "", text.len);
    sluice_buf_free(&text);
    return failed ? strerror(e) : NULL;
}

static const char *write_file(const sluice_json *step, sluice_buf *val) {
    const char *path = arg(step, "path"), *text = arg(step, "text");
    if (!path || !text) return "no \"path\" or \"text\"";
    FILE *f = fopen(path, "w");
    if (!f) return strerror(errno);
    size_t len = sluice_json_string_len(sluice_json_get(step, "text"));
    int e = 0;
    if (fwrite(text, 1, len, f) != len) e = errno;
    if (fclose(f) != 0 && !e) e = errno;
    if (e) return strerror(e);
    sluice_buf_puts(val, "null");
    return NULL;
}

static int compare_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static const char *env_names(sluice_buf *val) {
    size_t n = 0;
    while (environ && environ[n]) n++;
    char **names = malloc((n ? n : 1) * sizeof *names);
    if (!names) return "out of memory";
    for (size_t i = 0; i < n; i++) names[i] = environ[i];
    qsort(names, n, sizeof *names, compare_names); /* "NAME=": sorted by name */
    sluice_buf_puts(val, "[");
    for (size_t i = 0; i < n; i++) {
        if (i) sluice_buf_puts(val, ",");
        sluice_buf_json_string(val, names[i], strcspn(names[i], "="));
    }
    sluice_buf_puts(val, "]");
    free(names);
    return NULL;
}

static const char *http(const sluice_json *step, sluice_buf *val) {
    const char *method = arg(step, "method"), *url = arg(step, "url");
    if (!url) return "no \"url\"";
    const sluice_json *hs = sluice_json_get(step, "headers"), *body = sluice_json_get(step, "body");
    size_t n = sluice_json_len(hs);
    const char **headers = malloc((2 * n + 1) * sizeof *headers);
    if (!headers) return "out of memory";
    for (size_t i = 0; i < n; i++) {
        const sluice_json *h = sluice_json_at(hs, i);
        headers[2 * i] = sluice_json_string(sluice_json_at(h, 0));
        headers[2 * i + 1] = sluice_json_string(sluice_json_at(h, 1));
        if (!headers[2 * i] || !headers[2 * i + 1]) {
            free(headers);
            return "a header is not [name, value]";
        }
    }
    headers[2 * n] = NULL;
    sluice_http_response r;
    int err = sluice_http_request(method ? method : "GET", url, headers,
                                  (const uint8_t *)sluice_json_string(body),
                                  sluice_json_string_len(body), &r);
    free(headers);
    if (err) return sluice_http_error_name(err);
    sluice_buf_printf(val, "{\"status\":%d,\"body\":", r.status);
    sluice_buf_json_string(val, (const char *)r.body, r.body_len);
    sluice_buf_puts(val, "}");
    sluice_http_response_free(&r);
    return NULL;
}

static const char *get_json(const sluice_json *step, sluice_buf *val) {
    const char *url = arg(step, "url");
    if (!url) return "no \"url\"";
    sluice_json *v;
    int err = sluice_http_get_json(url, &v);
    if (err) return sluice_http_error_name(err);
    sluice_buf_json(val, v);
    sluice_json_free(v);
    return NULL;
}

/* wasi:sockets' error-code cases, as the WIT spells them. */
static const char *const SOCKET_ERRORS[] = {
    "unknown", "access-denied", "not-supported", "invalid-argument", "out-of-memory", "timeout",
    "concurrency-conflict", "not-in-progress", "would-block", "invalid-state", "new-socket-limit",
    "address-not-bindable", "address-in-use", "remote-unreachable", "connection-refused",
    "connection-reset", "connection-aborted", "datagram-too-large", "name-unresolvable",
    "temporary-resolver-failure", "permanent-resolver-failure",
};

static const char *socket_error(wasi_sockets_network_error_code_t code) {
    return code < sizeof SOCKET_ERRORS / sizeof *SOCKET_ERRORS ? SOCKET_ERRORS[code] : "unknown";
}

/* The decimal number at `*s` (at most `max`), ending in `end`; advances `*s` past `end`. */
static bool number(const char **s, unsigned max, char end, unsigned *out) {
    unsigned n = 0;
    const char *p = *s;
    if (*p < '0' || *p > '9') return false;
    for (; *p >= '0' && *p <= '9'; p++)
        if ((n = n * 10 + (unsigned)(*p - '0')) > max) return false;
    if (*p != end) return false;
    *s = end ? p + 1 : p;
    *out = n;
    return true;
}

/* A TCP connection to an IPv4 `addr` ("a.b.c.d:port") through the raw wasi:sockets bindings. */
static const char *connect_tcp(const sluice_json *step, sluice_buf *val) {
    const char *addr = arg(step, "addr");
    unsigned a, b, c, d, port;
    if (!addr || !number(&addr, 255, '.', &a) || !number(&addr, 255, '.', &b) ||
        !number(&addr, 255, '.', &c) || !number(&addr, 255, ':', &d) ||
        !number(&addr, 65535, '\0', &port))
        return "not an IPv4 address and port";
    wasi_sockets_tcp_create_socket_own_tcp_socket_t sock;
    wasi_sockets_network_error_code_t code;
    if (!wasi_sockets_tcp_create_socket_create_tcp_socket(
            WASI_SOCKETS_NETWORK_IP_ADDRESS_FAMILY_IPV4, &sock, &code))
        return socket_error(code);
    wasi_sockets_instance_network_own_network_t net =
        wasi_sockets_instance_network_instance_network();
    wasi_sockets_tcp_borrow_tcp_socket_t s = wasi_sockets_tcp_borrow_tcp_socket(sock);
    wasi_sockets_tcp_ip_socket_address_t remote = {
        .tag = WASI_SOCKETS_NETWORK_IP_SOCKET_ADDRESS_IPV4};
    remote.val.ipv4.port = (uint16_t)port;
    remote.val.ipv4.address = (wasi_sockets_network_ipv4_address_t){
        (uint8_t)a, (uint8_t)b, (uint8_t)c, (uint8_t)d};
    const char *err = NULL;
    if (!wasi_sockets_tcp_method_tcp_socket_start_connect(
            s, wasi_sockets_network_borrow_network(net), &remote, &code)) {
        err = socket_error(code);
    } else {
        wasi_io_poll_own_pollable_t ready = wasi_sockets_tcp_method_tcp_socket_subscribe(s);
        wasi_sockets_tcp_tuple2_own_input_stream_own_output_stream_t streams;
        while (!wasi_sockets_tcp_method_tcp_socket_finish_connect(s, &streams, &code)) {
            if (code != WASI_SOCKETS_NETWORK_ERROR_CODE_WOULD_BLOCK) {
                err = socket_error(code);
                break;
            }
            wasi_io_poll_method_pollable_block(wasi_io_poll_borrow_pollable(ready));
        }
        wasi_io_poll_pollable_drop_own(ready);
        if (!err) {
            wasi_io_streams_input_stream_drop_own(streams.f0);
            wasi_io_streams_output_stream_drop_own(streams.f1);
        }
    }
    wasi_sockets_tcp_tcp_socket_drop_own(sock); /* after its children, the pollable and streams */
    wasi_sockets_network_network_drop_own(net);
    if (!err) sluice_buf_puts(val, "\"connected\"");
    return err;
}

static const char *step_value(const sluice_json *step, sluice_buf *val) {
    const char *what = arg(step, "do");
    if (!what) return "the step has no string \"do\"";
    if (strcmp(what, "read") == 0) return read_file(step, val);
    if (strcmp(what, "write") == 0) return write_file(step, val);
    if (strcmp(what, "env") == 0 || strcmp(what, "secret") == 0) {
        const char *name = arg(step, "name");
        if (!name) return "no \"name\"";
        put_string_or_null(val, what[0] == 'e' ? sluice_env(name) : sluice_secret(name));
        return NULL;
    }
    if (strcmp(what, "env_names") == 0) return env_names(val);
    if (strcmp(what, "http") == 0) return http(step, val);
    if (strcmp(what, "get_json") == 0) return get_json(step, val);
    if (strcmp(what, "connect") == 0) return connect_tcp(step, val);
    return "unknown step";
}

sluice_result probe(const sluice_json *steps) {
    sluice_buf b = {0};
    sluice_buf_puts(&b, "[");
    for (size_t i = 0; i < sluice_json_len(steps); i++) {
        sluice_buf val = {0};
        const char *err = step_value(sluice_json_at(steps, i), &val);
        if (i) sluice_buf_puts(&b, ",");
        if (err) {
            sluice_buf_puts(&b, "{\"err\":");
            sluice_buf_json_string(&b, err, strlen(err));
        } else {
            sluice_buf_puts(&b, "{\"ok\":");
            sluice_buf_append(&b, val.data, val.len);
        }
        sluice_buf_puts(&b, "}");
        sluice_buf_free(&val);
    }
    sluice_buf_puts(&b, "]");
    return sluice_ok_buf(&b);
}
