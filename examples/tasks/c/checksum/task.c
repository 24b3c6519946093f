/* checksum: FNV-1a (64-bit) over the records, each as "<id>|<customer>|<cents>\n" in order.
 * Returns {"count": n, "fnv1a64": "<16 hex digits>"}. */
#include <inttypes.h>

#include <sluice.h>

static uint64_t fnv1a(uint64_t h, const char *bytes, size_t len) {
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)bytes[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

sluice_result run(const sluice_json *records) {
    if (!sluice_json_is_array(records))
        return sluice_fail("expected a list of records");
    uint64_t h = 0xcbf29ce484222325ULL;
    sluice_buf line = {0};
    for (size_t i = 0; i < sluice_json_len(records); i++) {
        const sluice_json *r = sluice_json_at(records, i);
        const sluice_json *id = sluice_json_get(r, "id");
        const sluice_json *customer = sluice_json_get(r, "customer");
        const sluice_json *cents = sluice_json_get(r, "cents");
        if (!sluice_json_is_integer(id) || !sluice_json_is_string(customer) ||
            !sluice_json_is_integer(cents)) {
            sluice_buf_free(&line);
            return sluice_fail("record %zu is not {id, customer, cents}", i);
        }
        line.len = 0;
        sluice_buf_printf(&line, "%" PRId64 "|", sluice_json_int(id));
        sluice_buf_append(&line, sluice_json_string(customer), sluice_json_string_len(customer));
        sluice_buf_printf(&line, "|%" PRId64 "\n", sluice_json_int(cents));
        h = fnv1a(h, line.data, line.len);
    }
    sluice_buf_free(&line);
    sluice_log_info("checksummed %zu records", sluice_json_len(records));
    return sluice_ok_fmt("{\"count\":%zu,\"fnv1a64\":\"%016" PRIx64 "\"}",
                         sluice_json_len(records), h);
}
