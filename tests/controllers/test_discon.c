/*
 * test_discon.c - a tiny Bladed-style controller whose every answer can be
 * predicted by a test, so the path OpenFAST -> client -> manager -> server ->
 * library and back can be checked end to end.
 *
 * Exported entry point: discon (lowercase), the Bladed DISCON signature.
 *
 * Contract, on EVERY call (N = number of calls made to this loaded copy):
 *   *aviFAIL     = 0
 *   avcMSG       = "DISCON called N times"  (NUL-terminated, at most record 49 bytes)
 *   record 47    = 2 x record 20           (generator torque = 2 x generator speed)
 *   record 120   = size in bytes of the file named by accINFILE (opened relative
 *                  to the working directory), or -1 when it cannot be opened
 * Test hooks on record 119, checked after the call is counted:
 *   666 -> raise(SIGSEGV)                 (a controller that crashes)
 *   667 -> sleep 30 s, then reply normally (a controller that hangs)
 *   668 -> *aviFAIL = -1, avcMSG = "requested failure"
 *
 * Records are 1-based as Bladed numbers them: record R is avrSWAP[R - 1].
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define REC(r) avrSWAP[(r) - 1]

/* Longest accINFILE we copy out when record 50 does not bound it. */
#define MAX_INFILE 4096

static long n_calls = 0;

/* Size in bytes of the file `name`, or -1 when it cannot be opened. */
static long file_size(const char *name)
{
    FILE *f = fopen(name, "rb");
    long size;

    if (f == NULL)
        return -1;
    if (fseek(f, 0, SEEK_END) != 0) {
        fclose(f);
        return -1;
    }
    size = ftell(f);
    fclose(f);
    return size;
}

/* accINFILE as a C string: up to its first NUL, at most record 50 - 1 bytes
 * (record 50 is the name's length plus its NUL); up to the first NUL alone when
 * record 50 gives no usable length. */
static void infile_name(const float *avrSWAP, const char *accINFILE, char *out, size_t cap)
{
    size_t limit = cap - 1;
    size_t n = 0;
    float n50 = REC(50);

    if (n50 >= 1.0f && n50 <= (float)cap)
        limit = (size_t)n50 - 1;
    if (accINFILE != NULL)
        while (n < limit && accINFILE[n] != '\0')
            n++;
    if (n > 0)
        memcpy(out, accINFILE, n);
    out[n] = '\0';
}

/* Write a NUL-terminated message of at most record 49 bytes. */
static void set_msg(const float *avrSWAP, char *avcMSG, const char *text)
{
    float n49 = REC(49);

    if (avcMSG == NULL || !(n49 >= 1.0f))
        return;
    snprintf(avcMSG, n49 > 1e9f ? (size_t)1000000000 : (size_t)n49, "%s", text);
}

void discon(float *avrSWAP, int *aviFAIL, const char *accINFILE, char *avcOUTNAME,
            char *avcMSG)
{
    char name[MAX_INFILE + 1];
    char text[64];
    float hook;

    (void)avcOUTNAME;
    n_calls++;
    *aviFAIL = 0;
    snprintf(text, sizeof text, "DISCON called %ld times", n_calls);
    set_msg(avrSWAP, avcMSG, text);
    REC(47) = 2.0f * REC(20);
    infile_name(avrSWAP, accINFILE, name, sizeof name);
    REC(120) = (float)file_size(name);

    hook = REC(119);
    if (hook == 666.0f) {
        raise(SIGSEGV);
    } else if (hook == 667.0f) {
        unsigned int left = 30;
        while (left > 0) /* sleep() returns early on a signal: finish the 30 s */
            left = sleep(left);
    } else if (hook == 668.0f) {
        *aviFAIL = -1;
        set_msg(avrSWAP, avcMSG, "requested failure");
    }
}
