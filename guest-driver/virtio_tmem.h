/* SPDX-License-Identifier: ((GPL-2.0 WITH Linux-syscall-note) OR BSD-3-Clause) */
/*
 * Wire format of the tmem virtio device (docs/protocol.md), in the style of
 * the uapi headers <linux/virtio_*.h>: fixed-size little-endian fields, no
 * kernel types, usable by a driver, a device model or a test program.
 */
#ifndef _LINUX_VIRTIO_TMEM_H
#define _LINUX_VIRTIO_TMEM_H

#include <linux/const.h>
#include <linux/types.h>
#include <linux/virtio_types.h>

/* Not allocated by the virtio specification: the VMM is told to use it. */
#define VIRTIO_ID_TMEM			63

#define VIRTIO_TMEM_MAGIC		0x4D454D54	/* "TMEM" little-endian */
#define VIRTIO_TMEM_VERSION		1
#define VIRTIO_TMEM_PAGE_SIZE		4096

/* Capability bits in virtio_tmem_config.caps: ops the device accepts. */
#define VIRTIO_TMEM_CAP_EXCLUSIVE_GET	_BITUL(0)
#define VIRTIO_TMEM_CAP_PUT_FILL	_BITUL(1)

struct virtio_tmem_config {
	__le32 magic;
	__le16 version;
	__le16 num_queues;		/* request queues, at least 1 */
	__le32 page_size;
	__le32 caps;			/* VIRTIO_TMEM_CAP_* */
	__le64 capacity_pages;		/* suggested swap size; 0: driver decides */
	__le64 reserved;
};

/* virtio_tmem_req.op */
#define VIRTIO_TMEM_OP_PUT		1	/* page follows the header */
#define VIRTIO_TMEM_OP_GET		2	/* page precedes the status */
#define VIRTIO_TMEM_OP_INVALIDATE_PAGE	3
#define VIRTIO_TMEM_OP_INVALIDATE_POOL	4
#define VIRTIO_TMEM_OP_PUT_FILL		5	/* page is arg repeated 512 times */

/* virtio_tmem_req.flags */
#define VIRTIO_TMEM_F_EXCLUSIVE		_BITUL(0)	/* GET: forget after reading */

/* The status byte: the last device-writable byte of a request. */
#define VIRTIO_TMEM_S_OK		0
#define VIRTIO_TMEM_S_NOT_FOUND		1
#define VIRTIO_TMEM_S_REJECTED		2
#define VIRTIO_TMEM_S_INVALID		3
#define VIRTIO_TMEM_S_IO_ERROR		4

/* The header every request starts with. */
struct virtio_tmem_req {
	__u8 op;
	__u8 flags;
	__le16 reserved;		/* must be 0 */
	__le32 pool;
	__le64 index;
	__le64 arg;
};

#ifdef __KERNEL__
#include <linux/build_bug.h>
#include <linux/stddef.h>

static_assert(sizeof(struct virtio_tmem_config) == 32);
static_assert(offsetof(struct virtio_tmem_config, num_queues) == 6);
static_assert(offsetof(struct virtio_tmem_config, caps) == 12);
static_assert(offsetof(struct virtio_tmem_config, capacity_pages) == 16);
static_assert(sizeof(struct virtio_tmem_req) == 24);
static_assert(offsetof(struct virtio_tmem_req, pool) == 4);
static_assert(offsetof(struct virtio_tmem_req, index) == 8);
static_assert(offsetof(struct virtio_tmem_req, arg) == 16);
#endif

#endif /* _LINUX_VIRTIO_TMEM_H */
